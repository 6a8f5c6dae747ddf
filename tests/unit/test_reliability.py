"""Issue 10's building blocks without a cluster: the depth scan, the constraint limits,
the sampler's arithmetic, error headers, and the handle's retry of a lost replica."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from ray.exceptions import ActorDiedError

from serve_apps.constraint_limits import (
    MAX_CONSTRAINT_CHARS,
    check_grammar,
    check_json_schema,
    check_regex,
    regex_repeat_cost,
)
from serve_apps.engines.base import SamplingParams
from serve_apps.engines.transformers_llm import sample_tokens
from serve_apps.errors import (
    DeadlineExceededError,
    OverloadedError,
    UnavailableError,
    error_body,
    error_headers,
    status_of,
)
from serve_apps.ingress import json_deeper_than
from serve_apps.ray_app import RayHandle


# ------------------------------------------------------------------ JSON depth
@pytest.mark.parametrize(
    ("body", "limit", "deeper"),
    [
        (b"[]", 1, False),
        (b"[[]]", 1, True),
        (b'{"a": {"b": [1, 2, {"c": null}]}}', 4, False),
        (b'{"a": {"b": [1, 2, {"c": null}]}}', 3, True),
        (b'{"s": "[[[[[[[[[[[[[[[[[["}', 1, False),  # brackets inside strings do not count
        (b'{"s": "\\"[[[[[[\\"", "t": [[]]}', 3, False),  # escaped quotes stay in the string
        (b'{"s": "\\"[[[[[[\\"", "t": [[]]}', 2, True),
        (b"[" * 600 + b"]" * 600, 64, True),
        (b'{"x": ' + b"[" * 64 + b"]" * 64 + b"}", 65, False),
        (b'{"x": ' + b"[" * 64 + b"]" * 64 + b"}", 64, True),
    ],
)
def test_json_depth_is_measured_outside_strings(body, limit, deeper):
    assert json_deeper_than(body, limit) is deeper
    if not deeper:
        json.loads(body)  # the cases are valid JSON: the scan agrees with the parser


# ------------------------------------------------------------------ constraint limits
def test_nested_counted_repeats_multiply():
    assert regex_repeat_cost("a{3}") == 3
    assert regex_repeat_cost("(a{10}){20}") == 200
    assert regex_repeat_cost("(?:x|(b{5}){7})+") == 35
    assert regex_repeat_cost("[a-z]+@[a-z]+") == 1
    with pytest.raises(ValueError, match="nests counted repetitions to 1000000"):
        check_regex("(a{1000}){1000}", "regex")
    check_regex("(a{100}){100}", "regex")  # 10,000: at the limit, allowed


def test_schema_patterns_and_sizes_are_checked():
    with pytest.raises(ValueError, match="a pattern in json_schema"):
        check_json_schema({"properties": {"x": {"type": "string", "pattern": "(a{999}){999}"}}})
    with pytest.raises(ValueError, match="patternProperties"):
        check_json_schema({"patternProperties": {"(b{200}){200}": {}}})
    with pytest.raises(ValueError, match="over 131072 characters"):
        check_json_schema({"enum": ["x" * MAX_CONSTRAINT_CHARS]})
    with pytest.raises(ValueError, match="grammar is over"):
        check_grammar("start: " + "a" * MAX_CONSTRAINT_CHARS)
    check_json_schema({"type": "object", "properties": {"n": {"pattern": "^[0-9]{3}$"}}})


def test_the_wire_models_refuse_costly_constraints_with_a_400_shape():
    from pydantic import ValidationError

    from serve_apps.schemas.common import Constraints

    with pytest.raises(ValidationError, match="nests counted repetitions"):
        Constraints.model_validate({"regex": "(a{1000}){1000}"})
    assert Constraints.model_validate({"regex": "[0-9]{3}"}).regex == "[0-9]{3}"


# ------------------------------------------------------------------ sampling arithmetic
def test_a_tiny_temperature_is_the_greedy_limit_not_a_nan():
    row = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    sp = SamplingParams(max_tokens=1, temperature=1e-300, top_p=1.0, seed=0)
    assert {sample_tokens(row, [sp], [u / 20])[0] for u in range(20)} == {1}


def test_a_tiny_top_p_keeps_the_most_likely_token():
    row = torch.tensor([[0.0, 0.5, 0.25]])
    sp = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-12, seed=0)
    assert {sample_tokens(row, [sp], [u / 20])[0] for u in range(20)} == {1}


def test_a_row_with_no_finite_logit_is_none_and_the_others_are_sampled():
    logits = torch.tensor([[0.0, 5.0, 0.0], [float("-inf")] * 3, [9.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    warm = SamplingParams(max_tokens=1, temperature=0.7, seed=0)
    assert sample_tokens(logits, [greedy, warm, warm], [0.0, 0.5, 0.5]) == [1, None, 0]


def test_batched_sampling_follows_each_rows_distribution():
    """Inverse CDF over the batch: each row's draw picks from its own tempered, top-p-cut
    distribution (masked tokens, at -inf, are never picked)."""
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0], [2.0, 1.0, 0.0, -9.0]])
    uniform = SamplingParams(max_tokens=1, temperature=1.0)
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.6)
    draws = [k / 100 for k in range(100)]
    picks = [sample_tokens(logits, [uniform, nucleus], [u, u]) for u in draws]
    first = [p[0] for p in picks]
    assert {t: first.count(t) for t in set(first)} == {0: 34, 1: 33, 3: 33}
    # softmax([2, 1, 0, -9]): 0.665, 0.245, ...; top-p 0.6 keeps token 0 alone.
    assert {p[1] for p in picks} == {0}


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (OverloadedError("queue full"), 503, "2"),
        (UnavailableError("replica lost"), 503, "5"),
        (DeadlineExceededError("too slow"), 504, "2"),
        (OverloadedError("busy", retry_after_s=0.2), 503, "1"),  # whole seconds, at least 1
    ],
)
def test_retryable_errors_say_when_to_retry_and_survive_pickling(error, status, retry_after):
    copy = pickle.loads(pickle.dumps(error))  # as a replica's error crosses Ray
    assert status_of(copy) == status
    assert error_headers(copy) == {"Retry-After": retry_after}
    assert error_body(copy)["error"]["code"] == error.code


def test_an_unexpected_error_names_no_internals():
    body = error_body(KeyError("secret_internal_field"))
    assert body["error"]["message"] == "internal error"
    assert "KeyError" not in json.dumps(body) and "secret" not in json.dumps(body)
    assert error_headers(KeyError("x")) == {}


# ------------------------------------------------------------------ the Ray handle's retry
class _Response:
    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        async def resolve():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return resolve().__await__()

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A DeploymentHandle whose ``invoke`` calls return the given outcomes in turn."""

    deployment_name = "LLM"

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    @property
    def invoke(self):
        handle = self

        class Method:
            def remote(self, *args, **kwargs):
                handle.calls += 1
                return _Response(handle.outcomes.pop(0))

        return Method()


async def test_a_replica_lost_before_answering_is_retried_once():
    handle = _Handle(ActorDiedError(), "answer")
    assert await RayHandle(handle).call("chat", object()) == "answer"  # type: ignore[arg-type]
    assert handle.calls == 2


async def test_a_second_loss_is_a_503_with_retry_after():
    handle = _Handle(ActorDiedError(), ActorDiedError(), "never reached")
    with pytest.raises(UnavailableError) as info:
        await RayHandle(handle).call("chat", object())  # type: ignore[arg-type]
    assert handle.calls == 2
    assert "LLM replica" in info.value.message
    assert error_headers(info.value) == {"Retry-After": "5"}
