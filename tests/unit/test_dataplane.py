"""Serve's data plane settings (serve_apps.dataplane): what every Ray cluster here starts with."""

import yaml

from serve_apps import dataplane
from serve_apps.config import Limits
from tests.conftest import REPO


def test_apply_sets_what_is_missing_and_keeps_what_is_set():
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    dataplane.apply(env)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # an explicit choice wins
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert {k: env[k] for k in dataplane.SERVE_ENV if k != "RAY_SERVE_ENABLE_HA_PROXY"} == {
        k: v for k, v in dataplane.SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"
    }


def test_every_admitted_body_fits_one_message_between_deployments():
    """A request the ingress admits crosses to a replica as one gRPC message: the limit is
    above the body limits of the defaults and of both shipped configs."""
    limits = [Limits()]
    for path in ("config.yaml", "cluster/serve-prod.yaml"):
        for app in yaml.safe_load((REPO / path).read_text())["applications"]:
            limits.append(Limits.model_validate(app["args"].get("limits", {})))
    largest = max(max([x.max_request_bytes, *x.route_max_request_bytes.values()]) for x in limits)
    assert 2 * largest <= dataplane.GRPC_MAX_MESSAGE_BYTES
    assert dataplane.SERVE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(
        dataplane.GRPC_MAX_MESSAGE_BYTES
    )


def test_own_ports_are_free_ports():
    import socket

    a: dict[str, str] = {}
    dataplane.own_ports(a)
    assert set(a) == set(dataplane.HAPROXY_OWN_PORTS)
    for port in a.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))  # nobody holds it


def test_the_fake_multinode_cluster_runs_the_classic_data_plane():
    env = dict(dataplane.SERVE_ENV)
    dataplane.classic(env)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
