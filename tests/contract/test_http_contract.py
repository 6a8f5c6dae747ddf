"""The HTTP contract: every route, streaming, constraints, and bad input, on every target.

The models are the smoke models (random weights), so the tests check shapes, guarantees
(constraints, stop strings, seeds, usage) and errors, never what the text says.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from tests.helpers import assert_envelope, sse_events

LLM, CODEGEN, DETECTOR = "smoke-llm", "smoke-codegen", "smoke-detector"
LORA = "smoke-llm-lora"  # the llm service's smoke adapter

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}


def chat(model=LLM, content="Say something.", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


# ------------------------------------------------------------------ discovery
def served_models(args) -> set[str]:
    return {
        name
        for s in ("llm", "codegen", "detector")
        if args.get(s)
        for name in [args[s]["served_model_name"], *(a["name"] for a in adapters(args, s))]
    }


def adapters(args, service="llm") -> list[dict]:
    return (args.get(service) or {}).get("adapters") or []


async def test_health(api):
    r = await api.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": sorted(served_models(api.args))}


async def test_models_list_every_model_service_and_say_they_are_smoke_models(api):
    r = await api.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    assert set(cards) == served_models(api.args)
    assert cards[LLM]["service"] == "llm" and cards[CODEGEN]["service"] == "codegen"
    if DETECTOR in cards:
        assert cards[DETECTOR]["service"] == "detector"
        assert "Qwen2.5-VL" in cards[DETECTOR]["description"]
    for card in cards.values():
        assert card["object"] == "model" and card["smoke"] is True
        assert "random weights" in card["description"]


async def test_an_adapter_is_a_model_of_its_own_on_every_route(api):
    assert [a["name"] for a in adapters(api.args)] == [LORA]
    cards = {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}
    assert cards[LORA]["service"] == "llm" and cards[LORA]["smoke"] is True
    assert "LoRA" in cards[LORA]["description"]
    body = {"prompt": "the cat sat on", "max_tokens": 12, "temperature": 0}
    texts = {}
    for model in (LLM, LORA):
        r = await api.post("/v1/completions", json={**body, "model": model})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts[model] = r.json()["choices"][0]["text"]
    assert texts[LLM] != texts[LORA], "the adapter changed nothing"
    r = await api.post("/v1/chat/completions", json=chat(model=LORA, max_tokens=6, temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == LORA
    r = await api.post(
        "/v1/chat/completions", json=chat(model=LORA, max_tokens=6, temperature=0, stream=True)
    )
    assert {c["model"] for c in sse_events(r.text)[:-1]} == {LORA}
    r = await api.post(
        "/v1/generate", json={"model": LORA, "prompt": "x", "constraints": {"regex": "[ab]{3}"}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["model"] == LORA and re.fullmatch(
        "[ab]{3}", r.json()["generated_text"]
    )


# ------------------------------------------------------------------ chat
async def test_chat_completion(api):
    r = await api.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == LLM
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_default_max_tokens_comes_from_config(api):
    r = await api.post("/v1/chat/completions", json=chat(temperature=0))
    assert r.json()["usage"]["completion_tokens"] <= 16


async def test_chat_stream(api):
    r = await api.post(
        "/v1/chat/completions",
        json=chat(
            max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        ),
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 10
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    whole = await api.post("/v1/chat/completions", json=chat(max_tokens=10, temperature=0))
    assert streamed == whole.json()["choices"][0]["message"]["content"]


async def test_chat_json_schema_response_format_validates(api):
    r = await api.post(
        "/v1/chat/completions",
        json=chat(
            max_tokens=200,
            temperature=1.0,
            seed=11,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA},
            },
        ),
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["constraint_satisfied"] is True
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


async def test_chat_json_object_response_format_is_an_object(api):
    r = await api.post(
        "/v1/chat/completions",
        json=chat(max_tokens=300, temperature=0.7, seed=3, response_format={"type": "json_object"}),
    )
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
        assert choice["constraint_satisfied"] is True
    else:  # a random model may write a long object; then it must say so
        assert choice["constraint_satisfied"] is False


async def test_chat_regex_and_grammar_extension(api):
    r = await api.post(
        "/v1/chat/completions",
        json=chat(max_tokens=30, seed=1, constraints={"regex": "(yes|no), [0-9]{2}"}),
    )
    choice = r.json()["choices"][0]
    assert (
        re.fullmatch("(yes|no), [0-9]{2}", choice["message"]["content"])
        and choice["constraint_satisfied"]
    )
    grammar = 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[A-Z][a-z]{1,6}/'
    r = await api.post(
        "/v1/chat/completions", json=chat(max_tokens=30, seed=2, constraints={"grammar": grammar})
    )
    choice = r.json()["choices"][0]
    assert re.fullmatch("(hi|hello) [A-Z][a-z]{1,6}", choice["message"]["content"]), choice


async def test_constrained_stream_reports_the_verdict_on_the_last_chunk(api):
    r = await api.post(
        "/v1/chat/completions",
        json=chat(max_tokens=20, seed=5, stream=True, constraints={"regex": "[a-c]{4}"}),
    )
    chunks = sse_events(r.text)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert re.fullmatch("[a-c]{4}", text)
    assert chunks[-1]["choices"][0]["constraint_satisfied"] is True


async def test_seed_makes_sampling_reproducible(api):
    body = chat(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    a, b = [await api.post("/v1/chat/completions", json=body) for _ in range(2)]
    assert (
        a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    )


async def test_stop_string_truncates(api):
    free = (
        await api.post(
            "/v1/completions",
            json={"model": LLM, "prompt": "The quick", "max_tokens": 20, "temperature": 0},
        )
    ).json()
    text = free["choices"][0]["text"]
    assert len(text) >= 12
    stop = text[8:11]
    cut = (
        await api.post(
            "/v1/completions",
            json={
                "model": LLM,
                "prompt": "The quick",
                "max_tokens": 20,
                "temperature": 0,
                "stop": [stop],
            },
        )
    ).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


async def test_concurrent_requests_all_complete(api):
    rs = await asyncio.gather(
        *(api.post("/v1/chat/completions", json=chat(max_tokens=12, seed=i)) for i in range(6))
    )
    assert [r.status_code for r in rs] == [200] * 6


# ------------------------------------------------------------------ completions
async def test_completion(api):
    r = await api.post(
        "/v1/completions", json={"model": LLM, "prompt": "Once upon", "max_tokens": 5}
    )
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 5


async def test_completion_stream(api):
    r = await api.post(
        "/v1/completions",
        json={
            "model": LLM,
            "prompt": "Once upon",
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
        },
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    whole = await api.post(
        "/v1/completions",
        json={"model": LLM, "prompt": "Once upon", "max_tokens": 6, "temperature": 0},
    )
    assert text == whole.json()["choices"][0]["text"]


# ------------------------------------------------------------------ /v1/generate
@pytest.mark.parametrize(
    ("constraints", "check"),
    [
        ({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"regex": r"def [a-z_]{1,10}\(\):"}, lambda t: re.fullmatch(r"def [a-z_]{1,10}\(\):", t)),
        (
            {"grammar": 'start: "SELECT " col " FROM t;"\ncol: "a" | "b" | "*"'},
            lambda t: re.fullmatch(r"SELECT (a|b|\*) FROM t;", t),
        ),
    ],
)
async def test_generate_output_matches_its_constraint(api, constraints, check):
    r = await api.post(
        "/v1/generate",
        json={
            "prompt": "Write it:",
            "constraints": constraints,
            "max_tokens": 200,
            "temperature": 0.8,
            "seed": 2,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "stop" and body["constraint_satisfied"] is True
    assert check(body["generated_text"]), body["generated_text"]
    assert body["tokens_generated"] > 0 and body["generation_time_ms"] > 0
    meta = body["metadata"]
    assert meta["model"] == CODEGEN and meta["constraint_type"] == next(iter(constraints))
    assert meta["tokens_per_sec"] > 0 and meta["prompt_tokens"] > 0


async def test_generate_cut_short_by_max_tokens_says_so(api):
    r = await api.post(
        "/v1/generate",
        json={"prompt": "x", "constraints": {"json_schema": SCHEMA}, "max_tokens": 3},
    )
    body = r.json()
    assert body["finish_reason"] == "length" and body["constraint_satisfied"] is False
    assert body["tokens_generated"] == 3


# ------------------------------------------------------------------ bad input
BAD_REQUESTS = [
    (
        "/v1/chat/completions",
        {
            "content": b'{"model": "smoke-llm", "messages": [',
            "headers": {"content-type": "application/json"},
        },
        400,
        "invalid_json",
    ),
    ("/v1/chat/completions", {"json": chat(temperature="warm")}, 400, "invalid_value"),
    ("/v1/chat/completions", {"json": chat(messages="hello")}, 400, "invalid_value"),
    ("/v1/chat/completions", {"json": chat(max_tokens=513)}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"json": chat(max_tokens=0)}, 400, "invalid_value"),
    ("/v1/chat/completions", {"json": chat(model="no-such-model")}, 404, "model_not_found"),
    (
        "/v1/chat/completions",
        {
            "json": chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            )
        },
        400,
        "invalid_constraint",
    ),
    (
        "/v1/chat/completions",
        {"json": chat(stream=True, constraints={"regex": "[unclosed"})},
        400,
        "invalid_constraint",
    ),
    (
        "/v1/completions",
        {"json": {"model": LLM, "prompt": "x", "constraints": {"grammar": "start: nothing_here"}}},
        400,
        "invalid_constraint",
    ),
    ("/v1/completions", {"json": {"model": LLM, "prompt": 42}}, 400, "invalid_value"),
    (
        "/v1/generate",
        {"json": {"prompt": "x", "constraints": {"regex": "(a"}}},
        400,
        "invalid_constraint",
    ),
    (
        "/v1/generate",
        {"json": {"prompt": "x", "constraints": {"regex": "a"}, "max_tokens": 100000}},
        400,
        "context_length_exceeded",
    ),
    (
        "/v1/generate",
        {"json": {"prompt": "x", "constraints": {"regex": "a"}, "temprature": 0}},
        400,
        "invalid_value",
    ),
    (
        "/v1/generate",
        {"json": {"prompt": "x", "constraints": {"regex": "a", "grammar": "start: 'a'"}}},
        400,
        "invalid_value",
    ),
    (
        "/v1/generate",
        {"json": {"prompt": "x", "constraints": {"regex": "a"}, "model": "nope"}},
        404,
        "model_not_found",
    ),
    (
        "/v1/generate",
        {"content": b"x" * 70000, "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    BAD_REQUESTS,
    ids=[f"{p}-{c}-{i}" for i, (p, _, _, c) in enumerate(BAD_REQUESTS)],
)
async def test_bad_input_gets_a_4xx_envelope_and_the_service_keeps_serving(
    api, path, kwargs, status, code
):
    assert_envelope(await api.post(path, **kwargs), status, code)
    ok = await api.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert ok.status_code == 200


async def test_prompt_over_the_models_context_is_a_400(api):
    long_prompt = "word " * 3000  # the smoke model's context is 2048 tokens
    r = await api.post(
        "/v1/completions", json={"model": LLM, "prompt": long_prompt, "max_tokens": 4}
    )
    err = assert_envelope(r, 400, "context_length_exceeded")
    assert "2048" in err["message"]


async def test_constraint_error_carries_the_compilers_message(api):
    r = await api.post("/v1/generate", json={"prompt": "x", "constraints": {"regex": "[a-"}})
    assert "unclosed character class" in assert_envelope(r, 400, "invalid_constraint")["message"]


async def test_unknown_route_is_a_404_envelope(api):
    assert_envelope(await api.get("/v2/everything"), 404)
