"""Grammar dialects (serve_apps.grammars) and the Ananke constraint fields on the wire."""

import pytest
from pydantic import ValidationError

from serve_apps.grammars import GrammarSyntaxError, bnf_to_gbnf, is_bnf, normalize
from serve_apps.schemas.common import Constraints

SEED_EXAMPLE = "function ::= 'fn' name '(' params ')' block"


def test_the_seeds_incomplete_grammar_names_its_undefined_rules():
    with pytest.raises(GrammarSyntaxError, match="does not define: name, params, block"):
        bnf_to_gbnf(SEED_EXAMPLE)
    with pytest.raises(ValidationError, match="does not define: name, params, block"):
        Constraints(grammar=SEED_EXAMPLE)


def test_single_quoted_ebnf_becomes_gbnf_with_a_root():
    out = bnf_to_gbnf("greeting ::= 'it''s' | 'say \"hi\"' tail\ntail ::= [a-z]+ # comment")
    assert out.splitlines() == [
        "root ::= greeting",
        'greeting ::= "it" "s" | "say \\"hi\\"" tail',
        "tail ::= [a-z]+",
    ]
    assert bnf_to_gbnf(r"root ::= 'a\'b'") == 'root ::= "a\'b"\n'


def test_gbnf_keeps_its_root_and_lark_passes_through():
    gbnf = 'root ::= "a" x\nx ::= "b"{1,3}'
    assert is_bnf(gbnf) and normalize(gbnf) == 'root ::= "a" x\nx ::= "b"{1,3}\n'
    lark = 'start: "a" x\nx: "b"'
    assert not is_bnf(lark) and normalize(lark) == lark


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ("a ::= 'x'\na ::= 'y'", "defined more than once: a"),
        ("'x' a ::= 'y'", "must begin with a rule"),
        ("a ::= 'x' @", "cannot read the grammar"),
    ],
)
def test_bad_bnf_is_refused_with_its_reason(grammar, message):
    with pytest.raises(GrammarSyntaxError, match=message):
        bnf_to_gbnf(grammar)


def test_regex_patterns_become_one_alternation_and_keep_their_name():
    c = Constraints(regex_patterns=[r"Result<.*>", r"Option<.*>"])
    assert c.kind == "regex" and c.type_name == "regex_patterns"
    assert c.spec == "(?:Result<.*>)|(?:Option<.*>)"
    with pytest.raises(ValidationError):
        Constraints(regex_patterns=[])
    with pytest.raises(ValidationError, match="regex_patterns"):
        Constraints(regex_patterns=["a", "(a{200}){200}"])


def test_token_ids_must_be_non_negative():
    with pytest.raises(ValidationError):
        Constraints(token_mask={"allowed_tokens": [-1]})
    with pytest.raises(ValidationError):
        Constraints(token_mask={"allowed_tokens": []})
