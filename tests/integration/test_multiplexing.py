"""Many adapters per pool on real Ray Serve: model multiplexing routes requests for an
adapter to the replica that already holds it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import driver_handle

pytestmark = pytest.mark.ray

APP, PREFIX = "mux", "/mux"
ARGS = {
    "llm": {
        "served_model_name": "mux-base",
        "default_max_tokens": 4,
        # Smoke adapters of three seeds; the first is loaded when a replica starts.
        "adapters": [{"name": f"mux-{seed}", "seed": seed} for seed in range(3)],
        "max_loaded_adapters": 2,
    },
    "codegen": None,
    "detector": None,
    "sam": None,
    "grounder": None,
}


@pytest.fixture(scope="module")
def mux_url(ray_serve_url):
    """The graph with just the llm service, on two replicas, beside the contract app."""
    from ray import serve

    from serve_apps.ray_app import bind_graph
    from serve_apps.registry import AppArgs

    app = bind_graph(AppArgs.model_validate(ARGS), {"LLM": {"num_replicas": 2}})
    serve.run(app, name=APP, route_prefix=PREFIX)
    yield f"{ray_serve_url}{PREFIX}"
    serve.delete(APP)


async def replica_stats() -> dict[str, dict]:
    """Stats of every LLM replica of the app, by replica id (asked until both answered)."""

    handle = driver_handle("LLM", APP)
    found: dict[str, dict] = {}
    for _ in range(60):
        stats = await handle.replica_stats.remote()
        found[stats["replica"]] = stats
        if len(found) == 2:
            return found
    raise AssertionError(f"only replicas {sorted(found)} answered")


def adapter_count(stats: dict, field: str, name: str) -> int:
    return int(stats["adapters"][field].get(name, 0))


async def test_repeated_requests_for_an_adapter_go_to_the_replica_that_loaded_it(mux_url):
    name = "mux-1"  # not loaded at start on either replica
    body = {"model": name, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=mux_url, timeout=120) as client:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        # The replica reports the adapters it holds to the routers every 0.1 s.
        await asyncio.sleep(2)
        first = await replica_stats()
        (holder,) = [rid for rid, s in first.items() if adapter_count(s, "requests", name)]
        for _ in range(8):
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
    after = await replica_stats()
    requests = {rid: adapter_count(s, "requests", name) for rid, s in after.items()}
    assert requests[holder] == 9 and sum(requests.values()) == 9, requests
    loads = {rid: adapter_count(s, "loads", name) for rid, s in after.items()}
    assert loads == {rid: int(rid == holder) for rid in after}, loads
    assert all(len(s["adapters"]["loaded"]) <= 2 for s in after.values())


async def test_an_unknown_adapter_is_a_404_and_the_base_model_still_answers(mux_url):
    async with httpx.AsyncClient(base_url=mux_url, timeout=120) as client:
        r = await client.post("/v1/completions", json={"model": "mux-9", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await client.post("/v1/completions", json={"model": "mux-base", "prompt": "x"})
        assert r.status_code == 200, r.text
        models = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert models == {"mux-base", "mux-0", "mux-1", "mux-2"}
