"""Batch vs interactive on the same graph, through real Ray Serve over HTTP.

    python -m bench.batch            # runs, then writes its section of BENCHMARKS.md

One local Ray cluster, the LLM on the smoke model (``max_batch_size`` 8) and the batch
runner with ``C`` lines in flight per batch and per service. In one run:

1. idle: ``PROBES`` short chat requests one after another (p50 latency);
2. interactive: ``LINES`` chat requests sent by ``C`` concurrent clients (throughput);
3. batch: the same ``LINES`` requests as one batch (throughput from create to completed);
4. busy: another batch of ``LINES`` running while the same probes as in 1 run (p50).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from typing import Any

import httpx

from bench.common import REPO, free_port, percentile, table, write_section

LINES = 500
C = 6  # concurrency of the interactive clients = the runner's per batch and per service
PROBES = 40
MAX_TOKENS = 16


def body(i: int) -> dict[str, Any]:
    return {
        "model": "smoke-llm",
        "messages": [{"role": "user", "content": f"line {i}: say something"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


def probe_body() -> dict[str, Any]:
    return {**body(-1), "max_tokens": 8}


def args(store: str) -> dict[str, Any]:
    return {
        "llm": {"served_model_name": "smoke-llm", "max_batch_size": 8},
        "codegen": None,
        "detector": None,
        "sam": None,
        "grounder": None,
        "batch": {
            "store_dir": store,
            "poll_s": 0.2,
            "max_concurrency_per_batch": C,
            "max_concurrency_per_service": C,
        },
    }


async def probes(client: httpx.AsyncClient, stop: asyncio.Event | None = None) -> list[float]:
    latencies = []
    while len(latencies) < PROBES and not (stop is not None and stop.is_set()):
        start = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=probe_body())
        r.raise_for_status()
        latencies.append(time.perf_counter() - start)
    return latencies


async def interactive(client: httpx.AsyncClient) -> float:
    queue = list(range(LINES))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            (await client.post("/v1/chat/completions", json=body(i))).raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(C)))
    return time.perf_counter() - start


async def submit(client: httpx.AsyncClient) -> str:
    data = "".join(
        json.dumps({"custom_id": str(i), "url": "/v1/chat/completions", "body": body(i)}) + "\n"
        for i in range(LINES)
    )
    files = {"file": ("in.jsonl", data.encode(), "application/jsonl")}
    file_id = (await client.post("/v1/files", files=files, data={"purpose": "batch"})).json()["id"]
    batch = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    r = await client.post("/v1/batches", json=batch)
    r.raise_for_status()
    return str(r.json()["id"])


async def finished(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    while True:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "cancelled"):
            return dict(batch)
        await asyncio.sleep(0.2)


async def run(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await probes(client)  # warm up
        idle = await probes(client)
        interactive_s = await interactive(client)
        start = time.perf_counter()
        batch = await finished(client, await submit(client))
        batch_s = time.perf_counter() - start
        assert batch["request_counts"]["completed"] == LINES, batch
        busy_id = await submit(client)
        await asyncio.sleep(2)  # the runner has claimed it and filled its slots
        busy = await probes(client)
        during = (await client.get(f"/v1/batches/{busy_id}")).json()["status"]
        await finished(client, busy_id)
    return {
        "idle": idle,
        "busy": busy,
        "busy_status_after_probes": during,
        "interactive_s": interactive_s,
        "batch_s": batch_s,
    }


def main() -> None:
    import ray
    from ray import serve

    from serve_apps.ray_app import build_app

    os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as store:
            serve.run(build_app(args(store)), route_prefix="/")
            result = asyncio.run(run(f"http://127.0.0.1:{port}"))
    finally:
        serve.shutdown()
        ray.shutdown()
    idle_p50, busy_p50 = percentile(result["idle"], 0.5), percentile(result["busy"], 0.5)
    rows = [
        [
            "interactive",
            C,
            f"{LINES / result['interactive_s']:.1f}",
            f"{result['interactive_s']:.1f}",
        ],
        ["batch", C, f"{LINES / result['batch_s']:.1f}", f"{result['batch_s']:.1f}"],
    ]
    ratio = result["interactive_s"] / result["batch_s"]
    latency = [
        ["idle", f"{idle_p50 * 1000:.0f}", f"{percentile(result['idle'], 0.9) * 1000:.0f}"],
        [
            "a batch running",
            f"{busy_p50 * 1000:.0f}",
            f"{percentile(result['busy'], 0.9) * 1000:.0f}",
        ],
    ]
    body_md = (
        f"{LINES} chat lines (smoke LLM, `max_tokens` {MAX_TOKENS}, greedy), "
        f"LLM `max_batch_size` 8, concurrency {C} (interactive clients; the runner's "
        "per batch and per service).\n\n"
        + table(["mode", "concurrency", "lines/s", "seconds"], rows)
        + f"\n\nBatch throughput / interactive throughput: **{ratio:.2f}x**.\n\n"
        + f"Interactive latency ({PROBES} sequential probes, `max_tokens` 8):\n\n"
        + table(["while", "p50 ms", "p90 ms"], latency)
        + f"\n\np50 while a batch runs / idle: **{busy_p50 / idle_p50:.2f}x** (the batch was "
        f"`{result['busy_status_after_probes']}` when the probes ended)."
    )
    write_section(
        "batch", "Batch API: batch vs interactive, interactive latency during a batch", body_md
    )


if __name__ == "__main__":
    main()
