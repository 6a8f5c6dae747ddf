"""The engine contract (serve_apps/engines/base.py), checked on every engine that runs here."""

import asyncio

import pytest

from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
from serve_apps.errors import (
    ConstraintError,
    ContextLengthError,
    InvalidRequestError,
    UnsupportedError,
)
from tests.fakes import FakeEngine

ENGINE_FIXTURES = {
    "transformers": "smoke_engine",
    "transformers-vl": "smoke_vl_engine",
    "vllm": "smoke_vllm_engine",
}


@pytest.fixture(
    params=["fake", "transformers", "transformers-vl", pytest.param("vllm", marks=pytest.mark.vllm)]
)
def engine(request):
    # Not async: the real engines are async session fixtures, fetched by name so that
    # each lane starts only the engines it runs.
    if request.param == "fake":
        eng = FakeEngine(reply="alpha beta gamma delta epsilon zeta eta theta iota kappa")
        asyncio.run(eng.start())
        return eng
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


def req(max_tokens=8, **kw):
    constraint = kw.pop("constraint", None)
    images = kw.pop("images", ())
    return GenerationRequest(
        prompt=kw.pop("prompt", "hello there"),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw
        ),
        constraint=constraint,
        images=images,
    )


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


async def test_stream_deltas_add_up_to_the_full_result(engine):
    outs = await collect(engine, req(max_tokens=6))
    full = await engine.generate_full(req(max_tokens=6))
    assert "".join(o.text for o in outs) == full.text
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    assert outs[-1].finish_reason in ("stop", "length")
    totals = [o.completion_tokens for o in outs]
    assert totals == sorted(totals) and totals[-1] == full.completion_tokens
    assert sum(len(o.token_ids) for o in outs) == full.completion_tokens
    # No empty chunks: every delta but the last carries text.
    assert all(o.text for o in outs[:-1])


async def test_max_tokens_ends_with_length(engine):
    out = await engine.generate_full(req(max_tokens=3))
    assert out.finish_reason == "length" and out.completion_tokens == 3


async def test_stop_string_ends_with_stop_and_is_not_in_the_text(engine):
    free = await engine.generate_full(req(max_tokens=12))
    assert len(free.text) >= 12, free.text
    stop = free.text[8:11]
    out = await engine.generate_full(req(max_tokens=12, stop=(stop,)))
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert stop not in out.text


@pytest.mark.parametrize(
    "bad",
    [Constraint("regex", "(unclosed"), Constraint("json_schema", {"type": 12})],
)
async def test_invalid_constraint_fails_before_the_first_output(engine, bad):
    stream = engine.generate(req(constraint=bad))
    with pytest.raises(ConstraintError):
        await anext(stream)


async def test_context_overflow_fails_before_the_first_output(engine):
    too_many = engine.info().max_model_len
    with pytest.raises(ContextLengthError):
        await anext(engine.generate(req(max_tokens=too_many)))


async def test_images_to_a_text_model_are_unsupported(engine):
    if engine.info().supports_images:
        # A vision model takes images, one per image placeholder in the prompt.
        with pytest.raises(InvalidRequestError, match="placeholder"):
            await anext(engine.generate(req(images=[object()])))
        return
    with pytest.raises(UnsupportedError):
        await anext(engine.generate(req(images=[object()])))


async def test_closing_the_stream_cancels_the_request(engine):
    before = engine.stats().get("tokens_generated", 0)
    stream = engine.generate(req(max_tokens=400 if not isinstance(engine, FakeEngine) else 8))
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()
    if isinstance(engine, FakeEngine):
        assert len(engine.cancelled) == 1
        return
    # The request leaves the engine (however long that takes on a busy machine)...
    for _ in range(600):
        if engine.stats()["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats()["in_flight"] == 0
    # ...having generated far fewer than its 400 tokens, and the engine keeps serving.
    assert engine.stats()["tokens_generated"] - before < 200
    out = await engine.generate_full(req(max_tokens=2))
    assert out.completion_tokens == 2
