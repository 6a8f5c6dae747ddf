"""The front door on real Ray Serve: limits shared by 2 ingress replicas, the request ID on
the replica's log line, and our counters in Ray's Prometheus exporter."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.conftest import CONTRACT_ARGS, CONTRACT_HEADERS, CONTRACT_KEYS

pytestmark = pytest.mark.ray

SHARED_RPM = 5


def _ingress_only_app(name: str, storage: str):
    """An app of two ingress replicas and no services (the limits are the ingress's)."""
    from ray import serve

    from serve_apps.ray_app import bind_graph
    from serve_apps.registry import AppArgs

    args = AppArgs.model_validate(
        {
            "llm": None,
            "codegen": None,
            "detector": None,
            "sam": None,
            "grounder": None,
            "auth": CONTRACT_ARGS["auth"],
            "rate_limits": {
                "keys": {"shared": {"requests_per_minute": SHARED_RPM}},
                "storage": storage,
            },
        }
    )
    options = {"Ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}}
    serve.run(bind_graph(args, options), name=name, route_prefix=f"/{name}")
    status = serve.status().applications[name].deployments["Ingress"]
    assert status.replica_states.get("RUNNING") == 2


async def _burst(base: str, n: int = 6 * SHARED_RPM) -> list[int]:
    headers = {"Authorization": f"Bearer {CONTRACT_KEYS['shared']}"}
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
        sem = asyncio.Semaphore(6)

        async def one() -> int:
            async with sem:
                return (await c.get("/health")).status_code

        return await asyncio.gather(*(one() for _ in range(n)))


def test_limits_hold_across_two_ingress_replicas(ray_serve_url):
    from ray import serve

    _ingress_only_app("fd-shared", "auto")
    _ingress_only_app("fd-local", "memory")
    try:
        shared = asyncio.run(_burst(f"{ray_serve_url}/fd-shared"))
        # The control burst must reach both replicas; HAProxy may learn of a new app's
        # second replica a moment after serve.run returns: burst again (same minute).
        local: list[int] = []
        deadline = time.monotonic() + 30
        while local.count(200) <= SHARED_RPM and time.monotonic() < deadline:
            local += asyncio.run(_burst(f"{ray_serve_url}/fd-local"))
    finally:
        serve.delete("fd-shared")
        serve.delete("fd-local")
    # One named actor counts for both replicas: exactly the limit gets through ...
    assert shared.count(200) == SHARED_RPM and set(shared) == {200, 429}
    # ... where counters per replica would let each replica's share through (the control:
    # it also shows that the burst reached both replicas).
    assert SHARED_RPM < local.count(200) <= 2 * SHARED_RPM


async def test_the_request_id_is_on_the_replicas_log_line(ray_serve_url):
    import ray

    rid = f"fd-log-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(
        base_url=ray_serve_url, timeout=120, headers=CONTRACT_HEADERS
    ) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": "smoke-llm",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            },
            headers={"x-request-id": rid},
        )
        assert r.status_code == 200 and r.headers.get_list("x-request-id") == [rid]
        bad = await c.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": []},
            headers={"x-request-id": rid},
        )
        assert bad.json()["error"]["request_id"] == rid
    logs = ray._private.worker._global_node.get_logs_dir_path()  # this session's, not another's
    from pathlib import Path

    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        for path in (Path(logs) / "serve").glob("replica_contract_LLM_*.log"):
            lines += [
                line
                for line in path.read_text(errors="replace").splitlines()
                if rid in line and "generation finished" in line
            ]
        await asyncio.sleep(0.5)
    assert lines, f"no LLM replica log line carries {rid}"
    assert "Hi" not in lines[0].split("generation finished", 1)[1]  # no prompt in the log


def _scrape(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value  # summed over replicas
    return total


async def test_counters_in_rays_exporter_move_by_exactly_the_requests_made(ray_serve_url):
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    name = "ray_serve_apps_requests_total"
    labels = {"route": "/v1/models", "status": "200", "key": "contract"}
    before = _scrape(port, name, **labels)
    n = 7
    async with httpx.AsyncClient(base_url=ray_serve_url, timeout=60, headers=CONTRACT_HEADERS) as c:
        for _ in range(n):
            assert (await c.get("/v1/models")).status_code == 200
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and _scrape(port, name, **labels) < before + n:
        await asyncio.sleep(1)
    await asyncio.sleep(3)  # two more report intervals: nothing more arrives
    assert _scrape(port, name, **labels) - before == n
