"""llguidance compilation, caching and masking, on the smoke model's real tokenizer."""

import numpy as np
import pytest
import torch

from serve_apps.engines.base import Constraint
from serve_apps.engines.constraints import (
    BatchMasker,
    ConstraintCompiler,
    blocked_tokens,
    blocked_tokens_torch,
    constraint_key,
)
from serve_apps.errors import ConstraintError


@pytest.fixture(scope="module")
def compiler(smoke_llm_dir):
    from transformers import AutoTokenizer

    return ConstraintCompiler.for_hf_tokenizer(AutoTokenizer.from_pretrained(smoke_llm_dir))


def test_key_is_a_content_hash_independent_of_key_order():
    a = Constraint("json_schema", {"type": "object", "properties": {"x": {"type": "integer"}}})
    b = Constraint("json_schema", {"properties": {"x": {"type": "integer"}}, "type": "object"})
    assert constraint_key(a) == constraint_key(b)
    assert constraint_key(a) != constraint_key(Constraint("regex", "x"))


def test_compiled_matchers_are_cached_by_content(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    before = (compiler.hits, compiler.misses)
    m1 = compiler.matcher(Constraint("json_schema", schema))
    m2 = compiler.matcher(Constraint("json_schema", dict(reversed(list(schema.items())))))
    assert (compiler.hits - before[0], compiler.misses - before[1]) == (1, 1)
    # Each request gets its own matcher state.
    assert m1 is not m2
    tok = compiler._tokenizer
    assert m1.consume_tokens(tok.tokenize_str('{"n":'))
    assert not m2.is_error() and m2.is_accepting() is False


@pytest.mark.parametrize(
    ("constraint", "needle"),
    [
        (Constraint("regex", "[a-"), "unclosed character class"),
        (Constraint("json_schema", {"type": "nonsense"}), "nonsense"),
        (Constraint("grammar", "start: undefined_rule"), "undefined_rule"),
        (Constraint("grammar", "start: ("), "invalid grammar"),
    ],
)
def test_invalid_constraints_raise_with_the_compilers_message(compiler, constraint, needle):
    with pytest.raises(ConstraintError) as info:
        compiler.matcher(constraint)
    assert needle in info.value.message
    assert info.value.status_code == 400 and info.value.param == constraint.kind


def test_masking_leaves_only_tokens_the_grammar_allows(compiler):
    vocab = compiler.vocab_size
    masker = BatchMasker(vocab)
    matcher = compiler.matcher(Constraint("regex", "[0-9]{2}x"))
    generator = torch.Generator().manual_seed(0)
    # Model vocab larger than the tokenizer's, as with padded embeddings.
    logits = torch.randn(3, vocab + 40, generator=generator)
    untouched = logits[1].clone()
    masker.apply(logits, [(0, matcher), (2, compiler.matcher(Constraint("regex", "a")))])
    assert torch.equal(logits[1], untouched)  # unconstrained row unchanged
    assert torch.isinf(logits[0, vocab:]).all()
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed, "some token must remain"
    for token in allowed:
        probe = matcher.deep_copy()
        assert probe.consume_token(token)
    text = compiler._tokenizer.decode_str(allowed[:1])
    assert text and text[0].isdigit()
    # Exactly the tokens of llguidance's own bitmask (bit t of word t // 32), no more.
    words = np.frombuffer(matcher.deep_copy().compute_bitmask(), dtype="<u4")
    expected = [t for t in range(vocab) if words[t // 32] >> (t % 32) & 1]
    assert allowed == expected


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1308, 151_936])
def test_unpacked_bitmasks_match_on_the_cpu_and_with_torch(vocab):
    """numpy's unpacking (the CPU's) and torch's (a GPU's) block the same tokens: those
    whose bit is clear, bit t % 32 of word t // 32."""
    generator = torch.Generator().manual_seed(vocab)
    words = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), generator=generator)
    bitmask = words.to(torch.int32)
    cpu = blocked_tokens(bitmask, vocab, "cpu")
    assert cpu.shape == (3, vocab) and cpu.dtype == torch.bool
    assert torch.equal(cpu, blocked_tokens_torch(bitmask, vocab))
    for t in (0, vocab // 2, vocab - 1):
        bit = (int(bitmask[1, t // 32]) >> (t % 32)) & 1
        assert bool(cpu[1, t]) == (bit == 0)


def test_parallel_and_looped_fills_mask_the_same(compiler):
    """llguidance's parallel executor (machines with 4+ CPUs) and the per-row loop (fewer)
    leave the same logits."""
    import llguidance

    vocab = compiler.vocab_size
    results = []
    for executor in (None, llguidance.LLExecutor()):
        masker = BatchMasker(vocab)
        masker._executor = executor
        rows = [
            (0, compiler.matcher(Constraint("regex", "[0-9]{2}x"))),
            (1, compiler.matcher(Constraint("json_schema", {"type": "object"}))),
        ]
        logits = torch.zeros(2, vocab)
        assert masker.apply(logits, rows) == []
        results.append(logits)
    assert torch.equal(*results)
    assert torch.isinf(results[0]).any() and torch.isfinite(results[0]).any()
