"""The ingress on fake engines, in-process: routing, the error envelope, streaming rules."""

import httpx
import pytest

from serve_apps.engines.base import GenerationOutput
from serve_apps.errors import EngineError
from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.registry import AppArgs
from serve_apps.replicas.llm import LLMServer
from tests.fakes import FakeEngine
from tests.helpers import assert_envelope, sse_events

ARGS = AppArgs.model_validate(
    {
        "llm": {"served_model_name": "fake-llm"},
        "codegen": {"served_model_name": "fake-codegen", "default_max_tokens": 2},
        "limits": {"max_tokens": 100, "max_request_bytes": 4096},
        # The vision routes have their own tests (tests/unit/test_vision_pipelines.py).
        "detector": None,
        "sam": None,
        "grounder": None,
    }
)


class StrictTemplate(FakeEngine):
    """A model whose chat template refuses conversations, as many HF templates do."""

    def apply_chat_template(self, messages):
        import jinja2

        if [m["role"] for m in messages] != ["user"]:
            raise jinja2.TemplateError("Conversation roles must alternate user/assistant/...")
        return super().apply_chat_template(messages)


class FailingMidStream(FakeEngine):
    async def generate(self, request):
        n = 0
        async for out in super().generate(request):
            n += 1
            if n == 3:
                raise EngineError("the GPU caught fire")
            yield out


@pytest.fixture
async def client():
    servers = {
        "llm": LLMServer(ARGS.llm, engine=StrictTemplate(reply="one two three four five six")),
        "codegen": LLMServer(ARGS.codegen, engine=FailingMidStream(reply='{"a": 1} x y z')),
    }
    for s in servers.values():
        await s.start()
    app = create_app(ARGS, {k: LocalHandle(v) for k, v in servers.items()})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def chat(model="fake-llm", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_routes_by_model_name(client):
    a = (await client.post("/v1/chat/completions", json=chat())).json()
    assert (
        a["model"] == "fake-llm"
        and a["choices"][0]["message"]["content"] == "one two three four five six"
    )
    b = (
        await client.post(
            "/v1/completions", json={"model": "fake-codegen", "prompt": "p", "max_tokens": 2}
        )
    ).json()
    assert b["model"] == "fake-codegen" and b["choices"][0]["text"] == '{"a": 1}'


async def test_generate_defaults_to_the_codegen_model_and_reports_the_constraint_verdict(client):
    r = await client.post(
        "/v1/generate",
        json={"prompt": "p", "constraints": {"json_schema": {"type": "object"}}, "max_tokens": 2},
    )
    body = r.json()
    assert r.status_code == 200 and body["metadata"]["model"] == "fake-codegen"
    assert body["generated_text"] == '{"a": 1}' and body["finish_reason"] == "length"
    assert body["constraint_satisfied"] is True  # the fake checks the text for real


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "param"),
    [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            None,
        ),
        ({"json": chat(temperature="hot")}, 400, "invalid_value", "temperature"),
        ({"json": {"model": "fake-llm"}}, 400, "invalid_value", "messages"),
        ({"json": chat(n=9)}, 400, "invalid_value", "n"),
        ({"json": chat(max_tokens=101)}, 400, "context_length_exceeded", "max_tokens"),
        ({"json": chat(model="gpt-9")}, 404, "model_not_found", "model"),
        ({"json": chat(constraints={"regex": "(unclosed"})}, 400, "invalid_constraint", "regex"),
        (
            {
                "json": chat(
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                        }
                    ]
                )
            },
            400,
            "unsupported",
            "messages",
        ),
    ],
)
async def test_bad_chat_requests_get_the_envelope(client, request_kwargs, status, code, param):
    r = await client.post("/v1/chat/completions", **request_kwargs)
    err = assert_envelope(r, status, code)
    assert err["param"] == param
    # ...and the service keeps answering.
    assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_generate_rejects_unknown_fields_and_two_constraints(client):
    r = await client.post(
        "/v1/generate", json={"prompt": "p", "constraints": {"regex": "a"}, "max_token": 3}
    )
    assert assert_envelope(r, 400, "invalid_value")["param"] == "max_token"
    r = await client.post(
        "/v1/generate", json={"prompt": "p", "constraints": {"regex": "a", "grammar": "start: A"}}
    )
    assert "at most one" in assert_envelope(r, 400, "invalid_value")["message"]


@pytest.mark.parametrize("body", [{"prompt": "p"}, {"prompt": "p", "constraints": {}}])
async def test_generate_without_constraints_is_free_generation(client, body):
    r = await client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["metadata"]["constraint_type"] == "none"
    assert out["constraint_satisfied"] is True  # nothing the text could fail


async def test_oversize_bodies_are_413_whether_declared_or_streamed(client):
    big = {"model": "fake-llm", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(await client.post("/v1/chat/completions", json=big), 413, "payload_too_large")

    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = await client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_envelope(r, 413, "payload_too_large")


async def test_unknown_routes_and_methods_use_the_envelope(client):
    assert_envelope(await client.get("/v1/nothing"), 404)
    assert_envelope(await client.get("/v1/chat/completions"), 405)


async def test_stream_errors_before_the_first_byte_set_the_status(client):
    r = await client.post(
        "/v1/chat/completions", json=chat(stream=True, constraints={"regex": "(x"})
    )
    assert_envelope(r, 400, "invalid_constraint")


async def test_stream_errors_after_the_first_byte_are_sent_in_band_and_terminated(client):
    r = await client.post(
        "/v1/chat/completions", json=chat(model="fake-codegen", stream=True, max_tokens=5)
    )
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error"
    assert "caught fire" in events[-2]["error"]["message"]


async def test_stream_chunks_follow_openai(client):
    r = await client.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    events = sse_events(r.text)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events[:-2])
    assert text == "one two three four five six"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    assert events[-1] == "[DONE]"


async def test_stream_interval_joins_deltas_after_the_first():
    """stream_interval 3: the first delta at once, then chunks of 3 tokens (the last one
    what is left); the text and the usage are the same as token by token."""
    args = AppArgs.model_validate(
        {**ARGS.model_dump(), "llm": {**ARGS.llm.model_dump(), "stream_interval": 3}}
    )
    server = LLMServer(args.llm, engine=FakeEngine(reply="one two three four five six seven"))
    await server.start()
    app = create_app(args, {"llm": LocalHandle(server), "codegen": LocalHandle(server)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(
            "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
        )
    events = sse_events(r.text)
    deltas = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    # (the fake engine ends with an empty delta that carries the finish reason)
    assert deltas == ["one", " two three four", " five six seven", ""]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 7


async def test_models_and_health(client):
    models = (await client.get("/v1/models")).json()
    assert {m["id"]: m["service"] for m in models["data"]} == {
        "fake-llm": "llm",
        "fake-codegen": "codegen",
    }
    assert all(m["smoke"] and "meaningless" in m["description"] for m in models["data"])
    assert (await client.get("/health")).json() == {
        "status": "ok",
        "models": ["fake-codegen", "fake-llm"],
    }


def test_output_type_is_what_the_contract_says():
    assert GenerationOutput("", [], 0, 0).finish_reason is None


async def test_a_chat_template_refusing_the_messages_is_a_400(client):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    r = await client.post("/v1/chat/completions", json=chat(messages=messages))
    err = assert_envelope(r, 400)
    assert err["param"] == "messages" and "alternate" in err["message"]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
async def test_seeds_outside_64_bits_are_a_400(client, seed):
    assert_envelope(await client.post("/v1/chat/completions", json=chat(seed=seed)), 400)
    r = await client.post(
        "/v1/generate", json={"prompt": "p", "constraints": {"regex": "a"}, "seed": seed}
    )
    assert assert_envelope(r, 400)["param"] == "seed"


async def test_generate_without_max_tokens_uses_the_models_default(client):
    r = await client.post("/v1/generate", json={"prompt": "p", "constraints": {"regex": "a"}})
    body = r.json()
    assert body["tokens_generated"] == 2 and body["finish_reason"] == "length"


async def test_health_names_the_services_that_are_not_ready_with_a_503(client):
    class Broken:
        async def health(self):
            raise EngineError("scheduler died")

    app = create_app(
        ARGS,
        {
            "llm": LocalHandle(Broken()),
            "codegen": LocalHandle(LLMServer(ARGS.codegen, engine=FakeEngine())),
        },
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.get("/v1/models")  # the ingress itself is up
        err = assert_envelope(await c.get("/health"), 503, "service_unavailable")
        assert "llm" in err["message"] and "scheduler died" in err["message"]
        assert "codegen" not in err["message"]
        live = await c.get("/health", params={"deep": "false"})  # liveness wakes nothing
        assert live.status_code == 200
