"""The transformers engine's batching, sampling and constraints on the smoke model."""

import asyncio
import hashlib
import json
import re

import jsonschema
import pytest

from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
from serve_apps.errors import EngineError
from tests.helpers import PERSON_SCHEMA as SCHEMA

PROMPTS = [
    "hello there",
    "The quick brown fox jumps over the lazy dog and keeps running far away",
    "a",
    "What is the capital of France?",
]


def greedy(prompt, n=24, **kw):
    return GenerationRequest(prompt, SamplingParams(max_tokens=n, temperature=0.0), **kw)


async def test_batched_generation_equals_generation_alone(smoke_engine):
    """Joining a running batch (left padding, cache merge, row removal) changes no token."""
    alone = [(await smoke_engine.generate_full(greedy(p))).token_ids for p in PROMPTS]

    async def staggered(i, prompt):
        await asyncio.sleep(0.01 * i)  # requests join while others are mid-generation
        return await smoke_engine.generate_full(greedy(prompt, n=24 - 3 * i))

    together = await asyncio.gather(*(staggered(i, p) for i, p in enumerate(PROMPTS)))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert b.token_ids == a[: 24 - 3 * i]


async def test_concurrent_requests_share_decode_steps(smoke_engine):
    before = smoke_engine.stats()
    await asyncio.gather(*(smoke_engine.generate_full(greedy(p, n=32)) for p in PROMPTS))
    after = smoke_engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert tokens == 4 * 32
    # One after another would take ~4*31 decode steps; batched they overlap.
    assert steps < 2 * 31
    assert after["max_batch_size"] >= 2


async def test_seeded_sampling_is_reproducible(smoke_engine):
    def sampled(seed):
        return GenerationRequest(
            "tell me", SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=seed)
        )

    a = await smoke_engine.generate_full(sampled(7))
    b = await smoke_engine.generate_full(sampled(7))
    c = await smoke_engine.generate_full(sampled(8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


async def test_json_schema_output_always_validates(smoke_engine):
    for seed in range(4):
        out = await smoke_engine.generate_full(
            GenerationRequest(
                "json please",
                SamplingParams(max_tokens=200, temperature=1.0, seed=seed),
                constraint=Constraint("json_schema", SCHEMA),
            )
        )
        assert out.finish_reason == "stop", out
        assert out.constraint_satisfied is True
        jsonschema.validate(json.loads(out.text), SCHEMA)


async def test_regex_and_grammar_outputs_match(smoke_engine):
    regex = r"[A-Z][a-z]{2,5}-[0-9]{3}"
    out = await smoke_engine.generate_full(
        GenerationRequest(
            "id:",
            SamplingParams(max_tokens=40, temperature=1.0, seed=3),
            Constraint("regex", regex),
        )
    )
    assert out.constraint_satisfied and re.fullmatch(regex, out.text), out
    grammar = (
        'start: "SELECT " COL " FROM " TABLE ";"\nCOL: "name" | "age" | "*"\nTABLE: /[a-z]{1,8}/'
    )
    out = await smoke_engine.generate_full(
        GenerationRequest(
            "sql:",
            SamplingParams(max_tokens=40, temperature=1.0, seed=4),
            Constraint("grammar", grammar),
        )
    )
    assert out.finish_reason == "stop" and out.constraint_satisfied, out
    assert re.fullmatch(r"SELECT (name|age|\*) FROM [a-z]{1,8};", out.text), out.text


async def test_output_cut_by_max_tokens_says_so(smoke_engine):
    out = await smoke_engine.generate_full(
        GenerationRequest(
            "json",
            SamplingParams(max_tokens=3, temperature=1.0, seed=0),
            Constraint("json_schema", SCHEMA),
        )
    )
    assert out.finish_reason == "length"
    assert out.constraint_satisfied is False


def test_the_smoke_model_is_rebuilt_identically_from_its_seed(tmp_path, smoke_llm_dir):
    from serve_apps.engines.smoke import build_smoke_llm

    build_smoke_llm(tmp_path)
    for name in ("model.safetensors", "tokenizer.json"):
        digest = [
            hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tmp_path, smoke_llm_dir)
        ]
        assert digest[0] == digest[1], name
    # config.json records the transformers version that wrote it; everything else is equal.
    configs = [json.loads((d / "config.json").read_text()) for d in (tmp_path, smoke_llm_dir)]
    for config in configs:
        config.pop("transformers_version", None)
    assert configs[0] == configs[1]


def test_two_engines_can_start_together_in_a_fresh_process(smoke_llm_dir, settings):
    """transformers resolves its lazy modules on first use; two threads doing that at once
    raised ImportError before engine loads were serialised (a fresh interpreter is needed:
    this test process has resolved them already)."""
    import subprocess
    import sys

    from serve_apps.engines.smoke import smoke_vl_path

    code = (
        "import asyncio, sys\n"
        "from serve_apps.engines.transformers_llm import TransformersEngine\n"
        "from serve_apps.engines.transformers_vl import TransformersVLEngine\n"
        "async def main():\n"
        "    a, b = TransformersEngine(sys.argv[1]), TransformersVLEngine(sys.argv[2])\n"
        "    await asyncio.gather(a.start(), b.start())\n"
        "    await asyncio.gather(a.shutdown(), b.shutdown())\n"
        "asyncio.run(main())\n"
    )
    vl = smoke_vl_path(settings.cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", code, str(smoke_llm_dir), str(vl)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
async def fresh_engine(smoke_llm_dir):
    from serve_apps.engines.transformers_llm import TransformersEngine

    engine = TransformersEngine(str(smoke_llm_dir), max_batch_size=4)
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_a_failed_prefill_fails_only_the_requests_it_was_admitting(fresh_engine):
    running = fresh_engine.generate(greedy("keep going", n=60))
    first = await anext(running)
    assert first.finish_reason is None

    def broken_prefill(new):
        raise RuntimeError("CUDA out of memory (simulated)")

    fresh_engine._prefill = broken_prefill
    with pytest.raises(EngineError, match="out of memory"):
        await fresh_engine.generate_full(greedy("a newcomer"))
    rest = [out async for out in running]
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 60


async def test_a_dead_scheduler_fails_its_requests_and_the_health_check(fresh_engine):
    original = fresh_engine._take_new
    calls = 0

    def dies_on_second_call():
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("scheduler bug")
        return original()

    fresh_engine._take_new = dies_on_second_call
    with pytest.raises(EngineError, match="scheduler bug"):
        await fresh_engine.generate_full(greedy("doomed", n=50))
    with pytest.raises(EngineError):
        fresh_engine.info()  # what health() calls: the replica gets replaced
    with pytest.raises(EngineError):
        await fresh_engine.generate_full(greedy("after death"))


# ------------------------------------------------------------------ one request cannot hurt another
async def test_a_row_that_fails_to_sample_fails_only_its_own_request(fresh_engine, monkeypatch):
    """A poison row (here: its sampler raises, as on a NaN row) fails its request with a
    clear error; the rows batched with it finish exactly as they would alone."""
    import serve_apps.engines.transformers_llm as module

    alone = [(await fresh_engine.generate_full(greedy(p, n=12))).token_ids for p in PROMPTS[:3]]
    real = module.sample_tokens

    def poisoned(logits, params, uniforms):
        tokens = real(logits, params, uniforms)
        return [None if p.seed == 666 else t for p, t in zip(params, tokens, strict=True)]

    monkeypatch.setattr(module, "sample_tokens", poisoned)
    poison = GenerationRequest(
        "poison", SamplingParams(max_tokens=12, temperature=0.8, top_p=1.0, seed=666)
    )
    results = await asyncio.gather(
        *(fresh_engine.generate_full(greedy(p, n=12)) for p in PROMPTS[:3]),
        fresh_engine.generate_full(poison),
        return_exceptions=True,
    )
    assert isinstance(results[3], EngineError) and "finite logit" in results[3].message
    assert [r.token_ids for r in results[:3]] == alone
    assert (await fresh_engine.generate_full(greedy("after", n=4))).completion_tokens == 4


async def test_a_request_past_its_deadline_is_dropped_while_queued_or_running(fresh_engine):
    import time

    from serve_apps.errors import DeadlineExceededError

    with pytest.raises(DeadlineExceededError, match="waited for a slot"):
        await fresh_engine.generate_full(greedy("late", n=8, deadline=time.time() - 1))
    before = fresh_engine.stats()["tokens_generated"]
    with pytest.raises(DeadlineExceededError, match="while it was generating"):
        await fresh_engine.generate_full(greedy("slow", n=2000, deadline=time.time() + 0.5))
    # Stopped at the deadline, not after 2,000 tokens; the engine serves the next request.
    assert fresh_engine.stats()["tokens_generated"] - before < 2000
    assert (await fresh_engine.generate_full(greedy("next", n=3))).completion_tokens == 3
