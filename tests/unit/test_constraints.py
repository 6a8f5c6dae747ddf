"""llguidance compilation, caching and masking, on the smoke model's real tokenizer."""

import pytest
import torch

from serve_apps.engines.base import Constraint
from serve_apps.engines.constraints import BatchMasker, ConstraintCompiler, constraint_key
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
