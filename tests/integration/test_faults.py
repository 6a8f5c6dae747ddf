"""Faults on real Ray Serve: a replica killed under load, and prompts far too big for the
model. Neither may hurt the other clients: no 500, no hang, no memory kept."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray

APP = "faults"
ARGS = {
    "llm": {"served_model_name": "smoke-llm", "default_max_tokens": 16},
    "codegen": None,
    "detector": None,
    "sam": None,
    "grounder": None,
    "limits": {"max_tokens": 512},  # the default body limit (16 MiB): big prompts get in
}


def chat(content="Say something.", **kw):
    return {"model": "smoke-llm", "messages": [{"role": "user", "content": content}], **kw}


def replicas(deployment: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"::{APP}#{deployment}#" in a["name"]
    )


def rss_mib(replica: str) -> float:
    import ray

    actor = ray.get_actor(replica, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def faults_url(ray_serve_url):
    """The graph (LLM only, two replicas) as a second app beside the contract app."""
    from ray import serve

    from serve_apps.ray_app import bind_graph
    from serve_apps.registry import AppArgs

    options = {"LLM": {"num_replicas": 2, "max_ongoing_requests": 16, "max_queued_requests": 64}}
    serve.run(bind_graph(AppArgs.model_validate(ARGS), options), name=APP, route_prefix=f"/{APP}")
    yield f"{ray_serve_url}/{APP}"
    serve.delete(APP)


async def test_a_killed_replica_costs_at_most_a_few_503s_and_serves_again(faults_url):
    import ray

    results: list[tuple[float, int, str | None]] = []
    t0 = time.monotonic()
    stop = t0 + 20
    async with httpx.AsyncClient(base_url=faults_url, timeout=60) as c:

        async def worker() -> None:
            while time.monotonic() < stop:
                r = await c.post("/v1/chat/completions", json=chat(max_tokens=24))
                results.append((time.monotonic() - t0, r.status_code, r.headers.get("retry-after")))

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        await asyncio.sleep(5)
        victim = replicas("LLM")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic() - t0
        await asyncio.gather(*workers)
        # Serve replaces the replica; the graph serves as before.
        deadline = time.monotonic() + 120
        while len(replicas("LLM")) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(1)
        assert len(replicas("LLM")) == 2 and victim not in replicas("LLM")
        after = await c.post("/v1/chat/completions", json=chat(max_tokens=4))
    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    # Every failure says when to retry; requests keep succeeding after the kill.
    assert all(retry for _, status, retry in results if status == 503)
    assert any(status == 200 for t, status, _ in results if t > killed_at + 2)
    assert after.status_code == 200


async def test_prompts_far_over_the_context_leave_no_memory_behind(faults_url):
    big = "word " * (12 * 2**20 // 5)  # 12 MiB, ~2.5M tokens: over any context
    async with httpx.AsyncClient(base_url=faults_url, timeout=120) as c:
        await c.post("/v1/chat/completions", json=chat(max_tokens=2))  # warm
        # Both replicas: the router picks either for each request.
        baseline = sum(rss_mib(r) for r in replicas("LLM"))
        for _ in range(6):
            r = await c.post("/v1/chat/completions", json=chat(big, max_tokens=2))
            assert r.status_code == 400, r.text[:300]
            assert r.json()["error"]["code"] == "context_length_exceeded"
        ok = await c.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert ok.status_code == 200
    # Refused before tokenizing: tokenizing them used to leave the replica 3.6 GiB larger
    # (bench/reliability.py bigprompt, before issue 10). What stays now is the allocator's
    # hold on the requests' own copies of the 12 MiB text (seen: 200-400 MiB).
    grown = sum(rss_mib(r) for r in replicas("LLM")) - baseline
    assert grown < 1024, f"the LLM replicas kept {grown:.0f} MiB after 6 refused prompts"
