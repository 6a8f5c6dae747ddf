"""The vLLM backend inside real Ray Serve replicas (opt-in lane: scripts/test-vllm).

The HTTP contract itself runs on this deployment as the ``vllm-ray`` contract target;
these check what only the replica shows: that it really serves with vLLM, that requests
share the engine, and that cancelling a stream through the handle aborts it in vLLM.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import CONTRACT_HEADERS, driver_handle

pytestmark = [pytest.mark.vllm, pytest.mark.ray]


def handle(name="LLM"):

    return driver_handle(name, "contract")


async def test_the_replicas_serve_with_vllm_in_spawned_processes(vllm_ray_serve_url):
    for name in ("LLM", "Codegen"):
        stats = await handle(name).stats.remote()
        assert "requests_unfinished" in stats, stats  # only VLLMEngine reports this
        assert stats["worker_multiproc_method"] == "spawn"


async def test_concurrent_http_requests_share_the_engine(vllm_ray_serve_url):
    # Long enough (the HTTP limit is 512) that requests overlap even on a busy machine;
    # Serve lets 5 in flight per replica by default, one of them the stats call.
    body = {"model": "smoke-llm", "prompt": "hi", "max_tokens": 500, "temperature": 1.0}
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, (await handle().stats.remote())["requests_unfinished"])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(
        base_url=vllm_ray_serve_url, timeout=120, headers=CONTRACT_HEADERS
    ) as c:
        rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
    watcher.cancel()
    assert [r.status_code for r in rs] == [200] * 8
    assert peak >= 3, f"at most {peak} requests were in the engine at once"


async def test_cancelling_a_stream_aborts_the_request_in_vllm(vllm_ray_serve_url):
    from serve_apps.schemas.openai import CompletionRequest

    # Straight to the replica (the HTTP limit caps max_tokens at 512): 1900 tokens take
    # seconds to generate, an abort takes a fraction of one.
    req = CompletionRequest.model_validate(
        {"model": "smoke-llm", "prompt": "go", "max_tokens": 1900, "stream": True}
    )
    stream = handle().options(stream=True).completion_stream.remote(req)
    await anext(stream)
    assert (await handle().stats.remote())["requests_unfinished"] == 1
    stream.cancel()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if (await handle().stats.remote())["requests_unfinished"] == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the request kept running in vLLM after its stream was cancelled")
