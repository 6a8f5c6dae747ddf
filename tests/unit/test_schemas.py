import pytest
from pydantic import ValidationError

from serve_apps.schemas.common import Constraints
from serve_apps.schemas.generate import GenerateRequest
from serve_apps.schemas.openai import ChatCompletionRequest, CompletionRequest


def test_constraints_take_at_most_one_kind():
    assert Constraints(regex="a+").kind == "regex"
    with pytest.raises(ValidationError, match="at most one"):
        Constraints(regex="a", grammar="start: 'a'")
    with pytest.raises(ValidationError, match="at most one"):
        Constraints(regex_patterns=["a"], json_schema={})
    # Nothing (free generation) and a token mask alone compile to no grammar.
    assert Constraints().kind is None and Constraints().type_name == "none"
    masked = Constraints(token_mask={"allowed_tokens": [1, 2], "forbidden_tokens": [2]})
    assert masked.kind is None and masked.type_name == "token_mask"
    assert masked.token_ids() == (frozenset({1, 2}), frozenset({2}))


def test_openai_requests_tolerate_unknown_fields():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {},
            "user": "u",
        }
    )
    assert req.model_extra == {"logit_bias": {}, "user": "u"}


def test_our_own_requests_forbid_unknown_fields():
    with pytest.raises(ValidationError, match="max_token"):
        GenerateRequest.model_validate(
            {"prompt": "p", "constraints": {"regex": "a"}, "max_token": 3}
        )


def test_response_format_becomes_a_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        }
    )
    c = req.effective_constraints()
    assert c is not None and c.kind == "json_schema" and c.spec == schema
    obj = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        }
    )
    assert obj.effective_constraints() == Constraints(json_schema={"type": "object"})


def test_response_format_and_constraints_together_are_rejected():
    with pytest.raises(ValidationError, match="not both"):
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
                "constraints": {"regex": "a"},
            }
        )


def test_stop_and_prompt_shapes():
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["one"], "stop": "x"})
    assert req.prompt_text() == "one" and req.stop_list() == ["x"]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "a", "stop": ["a"] * 5})
