"""The OpenAI parameters through the official ``openai`` client, on every target: each is
either served (``n``, ``logprobs``/``top_logprobs``, the penalties, ``stream_options``,
``response_format`` on completions, ``tools``/``tool_choice``) or a 400 naming it."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import CONTRACT_KEYS

LLM = "smoke-llm"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the forecast for a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture
def oai(api):
    # The contract target's own HTTP client (in-process, real HTTP or Modal) under the
    # official client; not closed here: the session fixture owns it.
    return openai.AsyncOpenAI(
        base_url=str(api.base_url).rstrip("/") + "/v1",
        api_key=CONTRACT_KEYS["contract"],
        http_client=api,
    )


async def test_n_gives_n_choices_and_usage_counts_them_all(oai):
    r = await oai.chat.completions.create(
        model=LLM, messages=MESSAGES, n=3, max_tokens=6, temperature=1.0, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # independent samples
    assert r.usage.completion_tokens <= 18 and r.usage.total_tokens == (
        r.usage.prompt_tokens + r.usage.completion_tokens
    )
    c = await oai.completions.create(model=LLM, prompt="hello", n=2, max_tokens=4, seed=1)
    assert [x.index for x in c.choices] == [0, 1]


async def test_logprobs_with_top_logprobs(oai):
    r = await oai.chat.completions.create(
        model=LLM, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.bytes == list(t.token.encode())
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, rel=1e-4)  # greedy
    c = await oai.completions.create(
        model=LLM, prompt="hello", max_tokens=4, logprobs=3, temperature=1.0, seed=7
    )
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n >= 1
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    plain = await oai.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=3)
    assert plain.choices[0].logprobs is None


async def test_penalties_change_the_output(oai):
    async def tokens(**kw):
        r = await oai.completions.create(
            model=LLM, prompt="hello", max_tokens=32, temperature=0, logprobs=0, **kw
        )
        return r.choices[0].logprobs.tokens

    plain = await tokens()
    penalized = await tokens(presence_penalty=2.0, frequency_penalty=2.0)
    assert len(set(penalized)) > len(set(plain))


@pytest.mark.parametrize("seed", range(6))
async def test_a_tool_call_validates_against_its_schema(oai, seed):
    r = await oai.chat.completions.create(
        model=LLM,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=1.0,
        seed=seed,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_a_named_tool_choice_calls_that_function(oai):
    r = await oai.chat.completions.create(
        model=LLM,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        seed=1,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])


@pytest.mark.parametrize("seed", range(4))
async def test_auto_gives_text_or_a_call_that_validates(oai, seed):
    r = await oai.chat.completions.create(
        model=LLM, messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    else:
        assert choice.message.content and not choice.message.content.startswith("<")


async def test_tool_choice_none_answers_in_text(oai):
    r = await oai.chat.completions.create(
        model=LLM, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8, seed=2
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_a_streamed_tool_call_and_include_usage(oai):
    stream = await oai.chat.completions.create(
        model=LLM,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish, usage = None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert usage is not None and usage.completion_tokens > 0


async def test_include_usage_on_a_plain_stream(oai):
    stream = await oai.completions.create(
        model=LLM, prompt="hi", max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


async def test_response_format_on_completions(oai):
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    r = await oai.completions.create(
        model=LLM,
        prompt="Answer in JSON:",
        max_tokens=60,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema},
            }
        },
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.text), schema)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
        ({"extra_body": {"prediction": {"type": "content", "content": "x"}}}, "prediction"),
    ],
)
async def test_an_unsupported_parameter_is_a_400_naming_it(oai, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=2, **kw)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and param in e.value.body["message"]


async def test_completions_refuse_echo_and_suffix(oai):
    for kw, param in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.completions.create(model=LLM, prompt="p", max_tokens=2, **kw)
        assert e.value.body["param"] == param


async def test_unknown_fields_stay_tolerated(oai):
    r = await oai.chat.completions.create(
        model=LLM, messages=MESSAGES, max_tokens=2, extra_body={"some_future_field": 1}
    )
    assert r.choices[0].message.content is not None
