"""One client cannot hurt another, on every target: bad input is a 4xx and the service
keeps serving the others; deadlines are a 504 that says when to retry."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import assert_envelope

LLM = "smoke-llm"


def chat(content="Say something.", **kw):
    return {"model": LLM, "messages": [{"role": "user", "content": content}], **kw}


DEPTH_40: list = []
for _ in range(39):
    DEPTH_40 = [DEPTH_40]

COSTLY = [
    pytest.param(
        "/v1/generate",
        {"prompt": "x", "constraints": {"json_schema": {"$ref": "#"}}},
        "invalid_constraint",
        id="self-referencing-schema",
    ),
    pytest.param(
        "/v1/generate",
        {"prompt": "x", "constraints": {"regex": "(a{1000}){1000}"}},
        "invalid_value",
        id="nested-counted-repeats",
    ),
    pytest.param(
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "string", "pattern": "(b{500}){500}"},
                },
            }
        ),
        "invalid_value",
        id="costly-pattern-inside-a-schema",
    ),
    pytest.param(
        "/v1/chat/completions",
        {**chat(), "extra": {"nested": DEPTH_40}},
        None,
        id="shallow-nesting-is-fine",
    ),
]


@pytest.mark.parametrize(("path", "body", "code"), COSTLY)
async def test_constraints_too_costly_to_compile_are_refused_fast(api, path, body, code):
    r = await api.post(path, json=body)
    if code is None:
        assert r.status_code == 200, r.text
    else:
        err = assert_envelope(r, 400, code)
        assert err["message"]
    assert (await api.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200


async def test_a_body_nested_past_the_limit_is_a_400_before_parsing(api):
    body = b'{"model": "smoke-llm", "messages": [], "x": ' + b"[" * 600 + b"]" * 600 + b"}"
    r = await api.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert "nests deeper than 64" in assert_envelope(r, 400, "invalid_json")["message"]


async def test_a_wrong_method_is_a_405_that_says_which_are_allowed(api):
    r = await api.get("/v1/chat/completions")
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


async def test_a_poison_request_batched_with_others_fails_nobody(api):
    """A temperature of 1e-300 once made a NaN that failed every request in its batch."""
    normal = [
        api.post("/v1/chat/completions", json=chat(f"hi {i}", max_tokens=8)) for i in range(7)
    ]
    poison = api.post(
        "/v1/chat/completions", json=chat("poison", max_tokens=8, temperature=1e-300, seed=1)
    )
    responses = await asyncio.gather(poison, *normal)
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]


async def test_a_client_deadline_is_a_504_with_retry_after_and_the_work_stops(api):
    r = await api.post(
        "/v1/completions",
        json={"model": LLM, "prompt": "go on", "max_tokens": 500, "ignore_eos": True},
        headers={"x-request-timeout": "0.05"},
    )
    if r.status_code == 400:  # the target does not take ignore_eos: the same without it
        r = await api.post(
            "/v1/completions",
            json={"model": LLM, "prompt": "go on", "max_tokens": 500},
            headers={"x-request-timeout": "0.05"},
        )
    err = assert_envelope(r, 504, "deadline_exceeded")
    assert "deadline" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert (await api.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200


async def test_a_streamed_request_past_its_deadline_ends_with_an_error_event(api):
    async with api.stream(
        "POST",
        "/v1/chat/completions",
        # A constraint that cannot end early: the random model cannot sample EOS first.
        json=chat(max_tokens=500, stream=True, constraints={"regex": "[a-z]{400}"}),
        headers={"x-request-timeout": "0.05"},
    ) as r:
        text = (await r.aread()).decode()
    if r.status_code == 200:  # the deadline passed after the first byte: in band
        assert "deadline_exceeded" in text
    else:
        assert r.status_code == 504 and "deadline_exceeded" in text
