"""What the front door costs: a short request with auth + rate limits on vs off.

    python -m bench.front_door [--requests 200]

Two applications on one real Ray Serve instance, the same graph (the smoke LLM alone):
``open`` (auth off, no limits) and ``guarded`` (auth on with a keys file, requests and
tokens per minute counted in the application's named Ray actor). Requests alternate
between them, one at a time, so both see the same machine. Two request kinds: a chat
completion of 4 tokens (a short generation) and ``GET /v1/models`` (the ingress alone,
where the front door's share is largest). Metrics are recorded on both (they have no
switch): their cost is in both columns.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, median, percentile, table, write_section

KEY = "sk-bench-front-door"


def _args(guarded: bool, keys_file: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "llm": {"served_model_name": "smoke-llm", "max_batch_size": 8},
        "codegen": None,
        "detector": None,
        "sam": None,
        "grounder": None,
    }
    if guarded:
        args["auth"] = {"enabled": True, "keys_env": None, "keys_file": keys_file}
        args["rate_limits"] = {"requests_per_minute": 1_000_000, "tokens_per_minute": 10**9}
    return args


async def _measure(url: str, requests: int) -> dict[tuple[str, str], list[float]]:
    import httpx

    chat = {
        "model": "smoke-llm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    times: dict[tuple[str, str], list[float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:

        async def one(app: str, kind: str, record: bool) -> None:
            t0 = time.perf_counter()
            if kind == "chat":
                r = await client.post(f"/{app}/v1/chat/completions", json=chat)
            else:
                r = await client.get(f"/{app}/v1/models")
            r.raise_for_status()
            if record:
                times.setdefault((app, kind), []).append(time.perf_counter() - t0)

        for i in range(10 + requests):  # 10 warm-up rounds, then interleaved
            for kind in ("chat", "models"):
                for app in ("open", "guarded") if i % 2 else ("guarded", "open"):
                    await one(app, kind, record=i >= 10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    opts = parser.parse_args()

    import ray
    from ray import serve

    from serve_apps.ray_app import build_app

    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text(f"bench={KEY}\n")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app in ("open", "guarded"):
            serve.run(
                build_app(_args(app == "guarded", str(keys))), name=app, route_prefix=f"/{app}"
            )
        times = asyncio.run(_measure(f"http://127.0.0.1:{port}", opts.requests))
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = []
    notes = []
    for kind, label in (("chat", "chat, 4 tokens"), ("models", "GET /v1/models")):
        off, on = times[("open", kind)], times[("guarded", kind)]
        p50_off, p50_on = median(off) * 1e3, median(on) * 1e3
        rows.append([label, p50_off, p50_on, percentile(off, 0.9) * 1e3, percentile(on, 0.9) * 1e3])
        notes.append(
            f"- {label}: the front door adds **{p50_on - p50_off:.2f} ms** at p50 "
            f"(**{(p50_on / p50_off - 1) * 100:+.1f}%**)"
        )
    write_section(
        "front-door",
        "Front door: auth + rate limits on vs off (short requests through Ray Serve)",
        table(["request", "p50 ms off", "p50 ms on", "p90 ms off", "p90 ms on"], rows)
        + "\n\n"
        + "\n".join(notes)
        + f"\n- {opts.requests} requests of each kind per app, interleaved, one at a time; "
        "on: a key checked against a keys file, requests and tokens per minute counted in "
        "the app's named Ray actor (one awaited actor call to admit, one to reserve tokens, "
        "and one sent without waiting to settle them); metrics recorded in both. Over the "
        "5% target: the cost is those actor round trips (the actor shares the 2 cores with "
        "everything else); `rate_limits.storage: memory` (per replica) or no limits avoids "
        "them.",
    )


if __name__ == "__main__":
    main()
