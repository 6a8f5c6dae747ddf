"""LoRA adapters on the transformers engine (PEFT): what an adapter costs, and what mixing
adapters in one batch costs.

    python -m bench.adapters

Two comparisons on the smoke LLM and smoke adapters (rank 8 on every projection), in
process, greedy, 8 requests at a time (one batch), rounds interleaved:

- **adapter vs base**: 8 requests for the base model vs 8 for one adapter, on the same
  engine (an engine with adapters runs every forward with ``adapter_names``);
- **4 adapters mixed vs 1 adapter**: 8 requests spread over 4 adapters (2 each, one
  batch: PEFT's mixed-adapter forward) vs 8 requests for one adapter;
- **base on an engine with adapters vs without**: the base model on an engine without
  adapters (no PEFT at all) against base requests on the engine with adapters (a step of
  base rows only runs the model without PEFT's layers: ``PeftAdapters.plain``).

Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.common import REPO, table, write_section

os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))
# One compute thread, as in a Ray replica with fewer than 2 CPUs (see bench/llm.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = [f"Write record number {i} as JSON:" for i in range(8)]
ADAPTERS = [f"lora-{seed}" for seed in range(4)]
MAX_TOKENS = 64


async def _engine(with_adapters: bool):
    from serve_apps.config import Settings
    from serve_apps.engines.adapters import AdapterSource
    from serve_apps.engines.smoke import smoke_llm_path, smoke_lora_path
    from serve_apps.engines.transformers_llm import TransformersEngine

    cache = Settings().cache_dir
    adapters = {
        name: AdapterSource(name, str(smoke_lora_path(cache, seed)))
        for seed, name in enumerate(ADAPTERS)
    }
    engine = TransformersEngine(
        str(smoke_llm_path(cache)),
        max_batch_size=8,
        adapters=adapters if with_adapters else None,
        max_loaded_adapters=len(ADAPTERS),
    )
    await engine.start()
    return engine


async def _batch(engine, adapters: list[str | None]) -> tuple[int, float]:
    """Tokens and seconds for one batch of 8 greedy requests (adapter per request)."""
    from serve_apps.engines.base import GenerationRequest, SamplingParams

    requests = [
        GenerationRequest(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), adapter=a)
        for p, a in zip(PROMPTS, adapters, strict=True)
    ]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate_full(r) for r in requests))
    return sum(o.completion_tokens for o in outs), time.perf_counter() - t0


async def run(rounds: int) -> None:
    plain = await _engine(with_adapters=False)
    lora = await _engine(with_adapters=True)
    cases = {
        "base model, engine without adapters": (plain, [None] * 8),
        "base model, engine with adapters": (lora, [None] * 8),
        "1 adapter (8 requests)": (lora, [ADAPTERS[0]] * 8),
        "4 adapters mixed (2 requests each)": (lora, ADAPTERS * 2),
    }
    for engine, adapters in cases.values():  # warm-up: adapters loaded, kernels touched
        await _batch(engine, adapters)
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (engine, adapters) in cases.items():
            runs[name].append(await _batch(engine, adapters))
    # The median round of each case: one round disturbed by another process on a shared
    # machine moves a total, not a median.
    medians = {name: sorted(r, key=lambda t: t[1])[len(r) // 2] for name, r in runs.items()}
    rate = {name: tokens / seconds for name, (tokens, seconds) in medians.items()}
    await plain.shutdown()
    await lora.shutdown()
    base = rate["base model, engine with adapters"]
    one = rate["1 adapter (8 requests)"]
    mixed = rate["4 adapters mixed (2 requests each)"]
    write_section(
        "adapters",
        "LoRA adapters (PEFT) on the transformers engine: adapter vs base, mixed batches",
        table(
            ["batch of 8 greedy requests", "tokens", "seconds (median round)", "tokens/s"],
            [[name, tokens, seconds, rate[name]] for name, (tokens, seconds) in medians.items()],
        )
        + f"\n\n- adapter / base tokens/s (same engine): **{one / base:.2f}**"
        + f"\n- 4 adapters mixed / 1 adapter tokens/s: **{mixed / one:.2f}**"
        + "\n- base model, engine with adapters / engine without: "
        + f"**{base / rate['base model, engine without adapters']:.2f}**"
        + f"\n- smoke LLM, smoke LoRAs (rank 8, all 7 projections), {MAX_TOKENS} tokens per "
        + f"request, {rounds} rounds interleaved after a warm-up, each case's median round, "
        + "one compute thread.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
