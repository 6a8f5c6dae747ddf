"""What only a real Ray Serve deployment shows: batching across HTTP requests, cancellation
when a client goes away, and errors crossing the handle unchanged."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import CONTRACT_HEADERS, driver_handle

pytestmark = pytest.mark.ray


async def llm_stats():

    return await driver_handle("LLM", "contract").stats.remote()


async def test_concurrent_http_requests_are_batched_in_the_replica(ray_serve_url):
    before = await llm_stats()
    body = {
        "model": "smoke-llm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    async with httpx.AsyncClient(
        base_url=ray_serve_url, timeout=120, headers=CONTRACT_HEADERS
    ) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(8)))
    assert all(r.status_code == 200 for r in rs)
    after = await llm_stats()
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert tokens == 8 * 24
    assert steps < 4 * 24, f"{steps} decode steps for 8 requests: they were not batched"


async def test_client_disconnect_stops_generation_on_the_replica(ray_serve_url):
    before = (await llm_stats())["tokens_generated"]
    body = {"model": "smoke-llm", "prompt": "go", "max_tokens": 500, "stream": True}
    async with (
        httpx.AsyncClient(base_url=ray_serve_url, timeout=60, headers=CONTRACT_HEADERS) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # first chunk seen; now hang up
    # The request leaves the replica's engine (however long the cancellation takes to
    # travel proxy -> ingress -> replica on a busy machine)...
    deadline = time.monotonic() + 60
    while (await llm_stats())["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    stats = await llm_stats()
    assert stats["in_flight"] == 0
    # ...having generated far fewer than its 500 tokens.
    assert stats["tokens_generated"] - before < 250, (
        "the replica kept generating after the client left"
    )


def test_remote_errors_arrive_as_our_exceptions(ray_serve_url):

    from serve_apps.errors import ConstraintError
    from serve_apps.ray_app import RayHandle
    from serve_apps.schemas.generate import GenerateRequest

    handle = RayHandle(driver_handle("Codegen", "contract"))
    bad = GenerateRequest.model_validate({"prompt": "x", "constraints": {"regex": "(oops"}})
    with pytest.raises(ConstraintError) as info:
        asyncio.run(handle.call("generate", bad))
    assert info.value.param == "regex"
