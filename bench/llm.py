"""LLM and codegen benchmarks (issue: foundation). Run one or all:

    python -m bench.llm constraints   # tokens/s with vs without a JSON-schema constraint
    python -m bench.llm batching      # tokens/s at concurrency 1 and 8 through the Serve ingress
    python -m bench.llm overhead      # p50 of a short request: Serve graph vs in-process engine
    python -m bench.llm coldstart     # `serve run config.yaml` -> first 200 from chat/completions
    python -m bench.llm all

Each writes its section of BENCHMARKS.md. Everything runs on the embedded smoke model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, SCHEMA, free_port, median, percentile, table, write_section
from serve_apps import dataplane

os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))
# In-process engines compute on one thread, as in a Ray replica with fewer than 2 CPUs
# (Ray sets OMP_NUM_THREADS from num_cpus): comparisons with the Serve path stay fair, and
# torch's default two threads collapse when anything else runs on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = [f"Write record number {i} as JSON:" for i in range(8)]


async def _engine(max_batch_size: int = 8):
    from serve_apps.config import Settings
    from serve_apps.engines.smoke import smoke_llm_path
    from serve_apps.engines.transformers_llm import TransformersEngine

    path = str(smoke_llm_path(Settings().cache_dir))
    engine = TransformersEngine(path, max_batch_size=max_batch_size)
    await engine.start()
    return engine


CONSTRAINT_LEVELS = (1, 8)


async def _constraint_run(
    engine: Any, constraint: Any, concurrency: int, round_: int
) -> tuple[int, float, float]:
    """(generated tokens, wall s, CPU s of this process) for the 8 prompts, each
    ``concurrency`` times, ``concurrency`` requests in flight throughout."""
    from serve_apps.engines.base import GenerationRequest, SamplingParams

    todo = [
        GenerationRequest(
            prompt,
            SamplingParams(max_tokens=128, temperature=1.0, seed=10_000 * round_ + 100 * k + i),
            constraint=constraint,
        )
        for k in range(concurrency)
        for i, prompt in enumerate(PROMPTS)
    ]
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while todo:
            out = await engine.generate_full(todo.pop())
            tokens += out.completion_tokens  # not `tokens += await ...`: that loses updates

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - t0, time.process_time() - c0


async def bench_constraints(rounds: int) -> None:
    """Tokens/s under a JSON-schema constraint vs none, at 1 and 8 requests in flight."""
    from serve_apps.engines.base import Constraint

    engine = await _engine(max(CONSTRAINT_LEVELS))
    constraint = Constraint("json_schema", SCHEMA)
    await engine.validate_constraint(constraint)  # compile once (cached by content hash)
    kinds = {"none": None, "JSON schema (llguidance)": constraint}
    # (concurrency, kind) -> [tokens, wall s, CPU s] summed over rounds
    totals = {(c, k): [0.0, 0.0, 0.0] for c in CONSTRAINT_LEVELS for k in kinds}
    await _constraint_run(engine, constraint, 8, -1)  # warm-up: allocations, first masks
    engine.masker.mask_seconds.clear()
    for r in range(rounds):
        for c in CONSTRAINT_LEVELS:
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for kind in order:  # interleaved, same prompts and seeds
                for i, x in enumerate(await _constraint_run(engine, kinds[kind], c, r)):
                    totals[(c, kind)][i] += x
    mask_us = median(engine.masker.mask_seconds) * 1e6
    p90_us = percentile(engine.masker.mask_seconds, 0.9) * 1e6
    await engine.shutdown()
    rows, ratios = [], []
    for c in CONSTRAINT_LEVELS:
        rates = {}
        for kind in kinds:
            tokens, wall, cpu = totals[(c, kind)]
            rates[kind] = (tokens / wall, tokens / cpu)
            rows.append([c, kind, int(tokens), wall, tokens / wall, tokens / cpu])
        (free, free_cpu), (bound, bound_cpu) = rates.values()
        ratios.append(
            f"\n- {c} in flight: constrained / unconstrained tokens/s **{bound / free:.2f}**, "
            f"tokens per CPU-second {bound_cpu / free_cpu:.2f}"
        )
    write_section(
        "constraints",
        "Constraint overhead (transformers engine, smoke model, 1 and 8 requests in flight)",
        table(
            ["in flight", "constraint", "tokens", "seconds", "tokens/s", "tokens per CPU-s"],
            rows,
        )
        + "\n"
        + "".join(ratios)
        + "\n- masking per masked step (computing the batch's masks after the forward pass "
        "was launched, and applying them to the logits): "
        + f"median **{mask_us:.0f} µs**, p90 {p90_us:.0f} µs (`engines.constraints.BatchMasker`)"
        + f"\n- {len(PROMPTS)} prompts, each once per request in flight, x {rounds} rounds; "
        "max_tokens 128 (a constrained answer ends when its JSON does), temperature 1.0, "
        "seeded; constrained and unconstrained runs alternate, order flipped each round; "
        "one torch thread (OMP_NUM_THREADS=1). CPU-seconds are this process's (the engine's "
        "thread, the mask thread and the event loop): the steadier figure on a shared machine.",
    )


def _start_serve(args: dict[str, Any]) -> str:
    import ray
    from ray import serve

    from serve_apps.ray_app import build_app

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


BENCH_ARGS = {
    "llm": {"served_model_name": "smoke-llm", "max_batch_size": 8},
    "codegen": {"served_model_name": "smoke-codegen", "max_batch_size": 8},
    # The LLM benchmarks measure the LLM services alone (bench/vision.py has the others).
    "detector": None,
    "sam": None,
    "grounder": None,
}


async def _load(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[int, float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        queue = list(range(requests))
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while queue:
                i = queue.pop()
                r = await client.post(
                    "/v1/completions",
                    json={
                        "model": "smoke-llm",
                        "prompt": f"Story {i}:",
                        "max_tokens": max_tokens,
                        "temperature": 1.0,
                        "seed": i,
                    },
                )
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, time.perf_counter() - t0


def bench_batching(rounds: int) -> None:
    url = _start_serve(BENCH_ARGS)
    try:
        asyncio.run(_load(url, 8, 8, 16))  # warm-up
        results: dict[int, list[float]] = {1: [], 8: []}
        for _ in range(rounds):
            for c in (1, 8):
                tokens, seconds = asyncio.run(_load(url, c, 16, 64))
                results[c].append(tokens / seconds)
    finally:
        _stop_serve()
    one, eight = median(results[1]), median(results[8])
    write_section(
        "batching",
        "Batching through the Serve ingress (HTTP -> Ingress -> LLM replica)",
        table(
            ["concurrent requests", "generated tokens/s (median of rounds)", "rounds"],
            [
                [1, one, ", ".join(f"{x:.0f}" for x in results[1])],
                [8, eight, ", ".join(f"{x:.0f}" for x in results[8])],
            ],
        )
        + f"\n\n- 8 concurrent / 1 at a time: **{eight / one:.2f}x** tokens/s"
        + "\n- 16 requests per round, max_tokens 64, temperature 1.0; max_batch_size 8.",
    )


def bench_overhead(requests: int) -> None:
    from serve_apps.config import ModelConfig
    from serve_apps.replicas.llm import LLMServer
    from serve_apps.schemas.openai import ChatCompletionRequest

    url = _start_serve(BENCH_ARGS)

    async def run() -> dict[str, list[float]]:
        import httpx

        server = LLMServer(ModelConfig(served_model_name="smoke-llm"))
        await server.start()
        body = {
            "model": "smoke-llm",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        req = ChatCompletionRequest.model_validate(body)
        times: dict[str, list[float]] = {"serve": [], "inprocess": []}
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for _ in range(5):  # warm-up
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                await server.chat(req)
            for _ in range(requests):  # interleaved
                t0 = time.perf_counter()
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
                times["serve"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await server.chat(req)
                times["inprocess"].append(time.perf_counter() - t0)
        await server.shutdown()
        return times

    try:
        times = asyncio.run(run())
    finally:
        _stop_serve()
    serve_p50, local_p50 = median(times["serve"]) * 1e3, median(times["inprocess"]) * 1e3
    write_section(
        "overhead",
        "Serving overhead: a short chat request through the Serve graph vs in-process",
        table(
            ["path", "p50 ms", "p90 ms"],
            [
                [
                    f"HTTP -> {dataplane.front_hop()} -> Ingress -> LLM replica",
                    serve_p50,
                    percentile(times["serve"], 0.9) * 1e3,
                ],
                [
                    "LLMServer.chat() in-process (same engine code)",
                    local_p50,
                    percentile(times["inprocess"], 0.9) * 1e3,
                ],
            ],
        )
        + f"\n\n- overhead of the graph: **{serve_p50 - local_p50:.1f} ms** at p50 "
        + f"(ratio {serve_p50 / local_p50:.2f}x)"
        + f"\n- {requests} requests each, interleaved; max_tokens 4, greedy.",
    )


def _time_to_first_chat(cache_dir: str) -> tuple[float, float]:
    """Seconds from `serve run` to /health 200 and to the first chat 200."""
    import httpx
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    tmp = Path(tempfile.mkdtemp())
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local", "SERVE_APPS_CACHE_DIR": cache_dir}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("serve")), "run", str(tmp / "config.yaml")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    body = {"model": "smoke-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    healthy = None
    try:
        while time.perf_counter() - t0 < 600:
            try:
                if (
                    healthy is None
                    and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                ):
                    healthy = time.perf_counter() - t0
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30
                )
                if r.status_code == 200:
                    return healthy or time.perf_counter() - t0, time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError("no 200 within 600 s")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_coldstart() -> None:
    rows = []
    fresh = tempfile.mkdtemp(prefix="smoke-cache-")
    try:
        rows.append(["empty model cache (smoke models built first)", *_time_to_first_chat(fresh)])
        rows.append(["warm model cache", *_time_to_first_chat(fresh)])
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    write_section(
        "coldstart",
        "Cold start: `serve run config.yaml` to the first 200 from /v1/chat/completions",
        table(["model cache", "s to /health 200", "s to first chat 200"], rows)
        + "\n\n- includes starting a local Ray cluster, Serve and every replica of "
        + "config.yaml, and loading (or first building) all of its smoke models.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "which", choices=["constraints", "batching", "overhead", "coldstart", "all"]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    opts = parser.parse_args()
    if opts.which in ("constraints", "all"):
        asyncio.run(bench_constraints(opts.rounds))
    if opts.which in ("batching", "all"):
        bench_batching(opts.rounds)
    if opts.which in ("overhead", "all"):
        bench_overhead(opts.requests)
    if opts.which in ("coldstart", "all"):
        bench_coldstart()


if __name__ == "__main__":
    main()
