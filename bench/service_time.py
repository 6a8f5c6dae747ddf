"""Service time per route (issue: what it costs): what one request uses of its services'
replicas, as the services measure it themselves (:mod:`serve_apps.service_time`,
``serve_apps_service_seconds``), for the embedded default (``config.yaml``'s smoke models).

    python -m bench.service_time [--requests 20] [--concurrency 4]

The app runs in-process (the real servers and engines behind ``create_app``, over ASGI),
so every service records into this process's metrics registry. Per route:

- one request at a time (``--requests`` of them): each request's service time is the
  change of the ``serve_apps_service_seconds`` sums across it (exact: nothing else runs);
  p50 and p90 of wall and CPU milliseconds, summed over the services the route uses;
- ``--concurrency`` requests at once (the same number in all): the mean service time per
  request (the sums' change / requests): what batching saves per request.

CPU time is the process's (all threads); at concurrency 1 that is the request's own work.
Writes its section of BENCHMARKS.md; the numbers feed ``python -m cluster cost
--service-time`` for a CPU deployment (see README "What it costs").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from bench.common import REPO, SCHEMA, percentile, table, write_section

os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))

NAME = "serve_apps_service_seconds"


def routes() -> dict[str, tuple[str, dict[str, Any]]]:
    """Route -> (path, body): one representative request of each."""
    from tests.helpers import b64, scene_png

    image = b64(scene_png(320, 240, seed=11))
    return {
        "chat": (
            "/v1/chat/completions",
            {
                "model": "smoke-llm",
                "messages": [{"role": "user", "content": "Say something about cost."}],
                "max_tokens": 64,
                "temperature": 0.0,
            },
        ),
        "generate": (
            "/v1/generate",
            {
                "prompt": "A person as JSON:",
                "constraints": {"json_schema": SCHEMA},
                "max_tokens": 128,
                "temperature": 0.0,
            },
        ),
        "detect": ("/v1/detect", {"image": image, "categories": ["person", "car"]}),
        "segment": (
            "/v1/segment",
            {"image": image, "boxes": [[10, 10, 120, 100], [150, 60, 300, 220]]},
        ),
        "ground": ("/v1/ground", {"image": image, "caption": "a man with two dogs near a car"}),
    }


def sums(text: str) -> dict[tuple[str, str], float]:
    """(service, clock) -> the metric's sum, from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{NAME}_sum":
                out[(s.labels["service"], s.labels["clock"])] = s.value
    return out


def delta(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def per_clock(d: dict[tuple[str, str], float], clock: str) -> float:
    return sum(v for (_, c), v in d.items() if c == clock)


async def measure(n: int, concurrency: int) -> list[list[Any]]:
    import httpx

    from serve_apps import metrics
    from serve_apps.config import load_serve_config
    from serve_apps.handles import LocalHandle
    from serve_apps.ingress import create_app
    from serve_apps.registry import AppArgs, create_servers

    config = load_serve_config(REPO / "config.yaml")
    args = AppArgs.model_validate(config["applications"][0]["args"])
    servers = create_servers(args)
    for server in servers.values():
        await server.start()
    app = create_app(args, {k: LocalHandle(v) for k, v in servers.items()})

    def scrape() -> dict[tuple[str, str], float]:
        return sums(metrics.render()[0].decode())

    rows = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as c:
        for route, (path, body) in routes().items():

            async def call(path: str = path, body: dict[str, Any] = body) -> None:
                r = await c.post(path, json=body)
                r.raise_for_status()

            await call()  # warm-up (first compile of a grammar, first image)
            walls, cpus, latencies, services = [], [], [], set()
            for _ in range(n):
                before, t0 = scrape(), time.perf_counter()
                await call()
                latencies.append((time.perf_counter() - t0) * 1000)
                d = delta(before, scrape())
                services |= {s for s, _ in d}
                walls.append(per_clock(d, "wall") * 1000)
                cpus.append(per_clock(d, "cpu") * 1000)
            before = scrape()
            await asyncio.gather(*(call() for _ in range(concurrency)))
            d = delta(before, scrape())
            rows.append(
                [
                    route,
                    ", ".join(sorted(services)),
                    percentile(walls, 0.5),
                    percentile(walls, 0.9),
                    percentile(cpus, 0.5),
                    percentile(cpus, 0.9),
                    percentile(latencies, 0.5),
                    per_clock(d, "wall") * 1000 / concurrency,
                    per_clock(d, "cpu") * 1000 / concurrency,
                ]
            )
            print(rows[-1], flush=True)
    for server in servers.values():
        await server.shutdown()
    return rows


def body(rows: Sequence[Sequence[Any]], n: int, concurrency: int) -> str:
    one, five, _ = os.getloadavg()
    header = [
        "route",
        "services",
        "wall ms p50",
        "wall ms p90",
        "CPU ms p50",
        "CPU ms p90",
        "latency ms p50",
        f"wall ms / request at {concurrency} at once",
        f"CPU ms / request at {concurrency} at once",
    ]
    return (
        f"The embedded default (`config.yaml`: smoke models on the CPU) in-process; {n} "
        f"requests per route one at a time (p50/p90 of each request's service time: the "
        f"change of `serve_apps_service_seconds` across it, summed over the services the "
        f"route uses), then {concurrency} at once (mean per request). Service time is what "
        f"a request used of its replicas: a batched engine's steps are split equally across "
        f"the rows in them (`serve_apps/service_time.py`); CPU is the process's, all "
        f"threads; SAM's encoder micro-batches are not split, so at concurrency its wall "
        f"times overlap (each counts the batch it waited in). Requests: chat 64 tokens "
        f"greedy; generate 128 tokens under the bench's "
        f"JSON schema; detect 2 categories, segment 2 boxes, ground a 7-word caption, on a "
        f"320x240 image. Load average {one:.1f} (1 min) / {five:.1f} (5 min) on "
        f"{os.cpu_count()} shared cores.\n\n" + table(header, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_time")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.requests, args.concurrency))
    write_section(
        "service_time",
        "Service time per route (embedded default)",
        body(rows, args.requests, args.concurrency),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
