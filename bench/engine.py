"""The transformers engine alone, in-process, on the embedded smoke LLM (no HTTP, no Serve):

    python -m bench.engine 32 128              # 32 concurrent, 128 requests of 64 tokens
    python -m bench.engine 8 64 --constrained  # the same under bench.common.SCHEMA

Prints generated tokens/s and tokens per CPU-second of this process (one torch thread, as
in a Ray replica with num_cpus 1): the CPU-second figure is the steadier one on a busy
machine. Run it on two trees side by side to compare engine changes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.common import REPO, SCHEMA

os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


async def run(concurrency: int, requests: int, constrained: bool) -> None:
    import torch

    from serve_apps.config import Settings
    from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
    from serve_apps.engines.smoke import smoke_llm_path
    from serve_apps.engines.transformers_llm import TransformersEngine

    torch.set_num_threads(1)
    engine = TransformersEngine(str(smoke_llm_path(Settings().cache_dir)), max_batch_size=64)
    await engine.start()
    prompt = engine.apply_chat_template([{"role": "user", "content": "Say something."}])
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        request = GenerationRequest(
            prompt,
            SamplingParams(max_tokens=64, temperature=1.0, seed=i),
            constraint=Constraint("json_schema", SCHEMA) if constrained else None,
        )
        async with slots:
            return (await engine.generate_full(request)).completion_tokens

    await one(-1)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(requests))))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"concurrency {concurrency}, {'constrained' if constrained else 'free'}: {tokens} tokens, "
        f"{tokens / wall:.0f} tok/s, {tokens / cpu:.0f} tok per CPU-second, "
        f"{engine.stats()['decode_steps']} decode steps"
    )
    await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("concurrency", type=int)
    parser.add_argument("requests", type=int)
    parser.add_argument("--constrained", action="store_true")
    opts = parser.parse_args()
    asyncio.run(run(opts.concurrency, opts.requests, opts.constrained))


if __name__ == "__main__":
    main()
