"""Sampling options on the transformers engine (smoke model): token masks, the OpenAI
penalties, logprobs, and Ananke's constraint forms compiled and obeyed."""

import math
import re

import pytest

from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
from serve_apps.errors import InvalidRequestError
from serve_apps.schemas.common import Constraints


def request(prompt="hello there", n=24, constraint=None, **sampling):
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(
        prompt, SamplingParams(max_tokens=n, **sampling), constraint=constraint
    )


@pytest.mark.parametrize("seed", range(4))
async def test_a_token_mask_is_obeyed_token_by_token(smoke_engine, seed):
    eos = set(smoke_engine.info().eos_token_ids)
    free = await smoke_engine.generate_full(request(n=12, temperature=1.0, seed=seed))
    allowed = frozenset(range(300, 340))
    forbidden = frozenset({free.token_ids[0], 305, 306})
    out = await smoke_engine.generate_full(
        request(
            n=12,
            temperature=1.0,
            seed=seed,
            allowed_token_ids=allowed,
            forbidden_token_ids=forbidden,
        )
    )
    assert out.token_ids
    for token in out.token_ids:
        assert token in eos or (token in allowed and token not in forbidden)


async def test_forbidden_tokens_alone_are_never_sampled(smoke_engine):
    free = await smoke_engine.generate_full(request(n=8))
    banned = frozenset(free.token_ids)
    out = await smoke_engine.generate_full(request(n=8, forbidden_token_ids=banned))
    assert not banned & set(out.token_ids)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ({"allowed_token_ids": frozenset({10**9})}, "not in the model's vocabulary"),
        ({"forbidden_token_ids": frozenset({10**9})}, "not in the model's vocabulary"),
        (
            {"allowed_token_ids": frozenset({5}), "forbidden_token_ids": frozenset({5})},
            "allows no token",
        ),
    ],
)
async def test_token_masks_are_checked_against_the_vocabulary(smoke_engine, mask, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        await smoke_engine.generate_full(request(**mask))
    assert e.value.param == "token_mask"


async def test_penalties_change_greedy_output_away_from_repeats(smoke_engine):
    plain = await smoke_engine.generate_full(request(n=32))
    penalized = await smoke_engine.generate_full(
        request(n=32, presence_penalty=2.0, frequency_penalty=2.0)
    )
    # Greedy decoding of the random smoke model repeats itself; the penalties subtract
    # from every token already generated, so the penalized text repeats less.
    assert len(set(plain.token_ids)) < len(plain.token_ids)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


async def test_a_negative_presence_penalty_favours_repeats(smoke_engine):
    out = await smoke_engine.generate_full(request(n=16, presence_penalty=-2.0))
    plain = await smoke_engine.generate_full(request(n=16))
    assert len(set(out.token_ids)) <= len(set(plain.token_ids))


async def test_logprobs_cover_every_token_with_ranked_alternatives(smoke_engine):
    out = await smoke_engine.generate_full(request(n=10, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token == smoke_engine.token_text(token)
        assert lp.logprob <= 0 and len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert math.isclose(lp.logprob, values[0], rel_tol=1e-5)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5


async def test_logprobs_zero_reports_the_sampled_token_only(smoke_engine):
    out = await smoke_engine.generate_full(request(n=4, logprobs=0))
    assert out.logprobs is not None and all(lp.top == () for lp in out.logprobs)
    plain = await smoke_engine.generate_full(request(n=4))
    assert plain.logprobs is None


def _constraint(**fields) -> Constraint:
    c = Constraints(**fields)
    assert c.kind is not None
    return Constraint(kind=c.kind, spec=c.spec)


@pytest.mark.parametrize("seed", range(6))
async def test_regex_patterns_output_matches_one_of_them(smoke_engine, seed):
    patterns = [r"Result<[a-z]{1,6}>", r"Option<[0-9]{1,4}>"]
    out = await smoke_engine.generate_full(
        request(n=20, temperature=1.0, seed=seed, constraint=_constraint(regex_patterns=patterns))
    )
    assert out.constraint_satisfied is True, out.text
    assert any(re.fullmatch(p, out.text) for p in patterns), out.text


SEED_GRAMMAR_COMPLETED = """
function ::= 'fn' ' ' name '(' params ')' ' ' block
name ::= [a-z] [a-z_]{0,7}
params ::= (name (', ' name){0,2})?
block ::= '{' [a-z ;]{0,12} '}'
"""


@pytest.mark.parametrize("seed", range(4))
async def test_the_seeds_ebnf_grammar_completed_compiles_and_is_obeyed(smoke_engine, seed):
    out = await smoke_engine.generate_full(
        request(
            n=60,
            temperature=1.0,
            seed=seed,
            constraint=_constraint(grammar=SEED_GRAMMAR_COMPLETED),
        )
    )
    assert out.constraint_satisfied is True, out.text
    name = r"[a-z][a-z_]{0,7}"
    assert re.fullmatch(
        rf"fn {name}\(({name}(, {name}){{0,2}})?\) \{{[a-z ;]{{0,12}}\}}", out.text
    ), out.text
