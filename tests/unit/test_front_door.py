"""The front door in-process: API keys, rate limits, metrics, request IDs in errors and logs."""

from __future__ import annotations

import logging
import math

import httpx
import pytest

from serve_apps import auth, metrics
from serve_apps.config import AuthConfig, KeyLimits
from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.ratelimit import Counters, format_reset
from serve_apps.registry import AppArgs
from serve_apps.replicas.llm import LLMServer
from serve_apps.request_context import JSONLogFormatter, current, install_log_context
from tests.fakes import FakeEngine
from tests.helpers import assert_envelope

KEYS = (
    "team-a=sk-team-a-0001, limited=sk-limited-0002\nci=" + "sha256:" + auth.hash_key("sk-ci-0003")
)


def app_args(**sections):
    return AppArgs.model_validate(
        {
            "llm": {"served_model_name": "fake-llm", "default_max_tokens": 8},
            "codegen": None,
            "detector": None,
            "sam": None,
            "grounder": None,
            **sections,
        }
    )


class KeyEchoEngine(FakeEngine):
    """Answers with the key name the engine's side of the seam sees."""

    async def generate(self, request):
        meta = current()
        self.reply = f"key {meta.key_name if meta else None}"
        async for out in super().generate(request):
            yield out


async def make_client(args, engine=None):
    server = LLMServer(args.llm, engine=engine or FakeEngine(reply="a b c d e f g h"))
    await server.start()
    app = create_app(args, {"llm": LLMServer and LocalHandle(server)})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def chat(**kw):
    return {"model": "fake-llm", "messages": [{"role": "user", "content": "hello there"}], **kw}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ keys
def test_keys_parse_with_names_and_hashes_and_errors_never_show_a_key():
    keys = auth.parse_keys(KEYS, "test")
    assert [k.name for k in keys] == ["team-a", "limited", "ci"]
    assert keys[2].sha256 == bytes.fromhex(auth.hash_key("sk-ci-0003"))
    with pytest.raises(ValueError, match="entry 1 is not name=key") as e:
        auth.parse_keys("sk-secret-without-name", "test")
    assert "sk-secret" not in str(e.value)
    with pytest.raises(ValueError, match=r"entry 1 \(x\) is not a sha256"):
        auth.parse_keys("x=sha256:abcd", "test")
    assert auth.bearer_key(b"Bearer  k1 ", None) == "k1"
    assert auth.bearer_key(b"Basic k1", b"k2") == "k2"
    assert auth.bearer_key(None, None) is None


def test_auth_on_without_any_key_fails_at_start(tmp_path):
    config = AuthConfig(enabled=True, keys_env="NO_SUCH_VAR", keys_file=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no API keys were found"):
        auth.KeyStore(config, environ={})


async def test_every_route_but_liveness_needs_a_key(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", KEYS)
    args = app_args(auth={"enabled": True, "keys_env": "TEST_KEYS"})
    async with await make_client(args, KeyEchoEngine()) as c:
        assert (await c.get("/health", params={"deep": "false"})).status_code == 200
        for r in (
            await c.get("/health"),
            await c.get("/v1/models", headers={"x-request-id": "no-key-1"}),
            await c.post("/v1/chat/completions", json=chat()),
            await c.get("/metrics"),
            await c.get("/openapi.json"),
            await c.get("/no/such/route"),
        ):
            err = assert_envelope(r, 401, "missing_api_key")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert err["request_id"] == r.headers["x-request-id"]
        wrong = await c.get("/v1/models", headers=bearer("sk-team-a-0002"))
        assert_envelope(wrong, 401, "invalid_api_key")
        for headers in (bearer("sk-team-a-0001"), {"x-api-key": "sk-ci-0003"}):
            assert (await c.get("/v1/models", headers=headers)).status_code == 200
        # The key's name (never the key) reaches the replica side of the seam.
        r = await c.post("/v1/chat/completions", json=chat(), headers={"x-api-key": "sk-ci-0003"})
        assert r.json()["choices"][0]["message"]["content"].startswith("key ci")


async def test_a_key_removed_from_the_file_is_refused_without_a_restart(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("a=sk-a-1\nb=sk-b-2\n")
    args = app_args(auth={"enabled": True, "keys_env": None, "keys_file": str(keys)})
    async with await make_client(args) as c:
        assert (await c.get("/v1/models", headers=bearer("sk-b-2"))).status_code == 200
        keys.write_text("a=sk-a-1\n# b revoked\n")
        assert_envelope(await c.get("/v1/models", headers=bearer("sk-b-2")), 401)
        assert (await c.get("/v1/models", headers=bearer("sk-a-1"))).status_code == 200


async def test_auth_off_is_logged_once_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_apps.front_door"):
        async with await make_client(app_args()) as c:
            assert (await c.get("/v1/models")).status_code == 200
            assert (await c.get("/v1/models")).status_code == 200
    assert [r.message for r in caplog.records].count(
        "auth is off: every route answers without an API key (set auth.enabled and a keys "
        "secret in production)"
    ) == 1


# ------------------------------------------------------------------ rate limits
def test_counters_count_reserve_and_settle_within_a_window():
    counters = Counters()
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=100)
    first = counters.admit("k", limits)
    assert first.allowed and first.requests.remaining == 1 and first.tokens.remaining == 100
    assert counters.admit("k", limits).requests.remaining == 0
    refused = counters.admit("k", limits)
    assert not refused.allowed and refused.refused == "requests"
    assert 0 < refused.retry_after_s <= 60
    assert counters.admit("other", limits).allowed  # per key
    reserved = counters.reserve("k", limits, 70)
    assert reserved.allowed and reserved.tokens.remaining == 30
    over = counters.reserve("k", limits, 40)
    assert not over.allowed and over.refused == "tokens" and over.retry_after_s is not None
    never = counters.reserve("k", limits, 101)
    assert not never.allowed and never.retry_after_s is None
    counters.settle("k", limits, -50, reserved.tokens.reset_at)  # used 20 of its 70
    assert counters.reserve("k", limits, 0).tokens.remaining == 80
    counters.settle("k", limits, -50, reserved.tokens.reset_at - 60)  # another window: ignored
    assert counters.reserve("k", limits, 0).tokens.remaining == 80
    counters.settle("k", limits, 30, reserved.tokens.reset_at)  # a use over its estimate
    assert counters.reserve("k", limits, 0).tokens.remaining == 50
    assert (
        format_reset(0.2) == "1s" and format_reset(360) == "6m0s" and format_reset(61.5) == "1m2s"
    )


async def test_requests_over_the_limit_are_429_with_openais_headers(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", KEYS)
    args = app_args(
        auth={"enabled": True, "keys_env": "TEST_KEYS"},
        rate_limits={"keys": {"limited": {"requests_per_minute": 2}}},
    )
    async with await make_client(args) as c:
        seen = []
        for _ in range(3):
            r = await c.get("/v1/models", headers=bearer("sk-limited-0002"))
            seen.append(r)
        assert [r.status_code for r in seen] == [200, 200, 429]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in seen] == ["1", "0", "0"]
        for r in seen:
            assert r.headers["x-ratelimit-limit-requests"] == "2"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert "x-ratelimit-limit-tokens" not in r.headers  # no token limit for this key
        err = assert_envelope(seen[2], 429, "rate_limit_exceeded")
        assert 1 <= int(seen[2].headers["retry-after"]) <= 60
        assert "limited" in err["message"]
        # Other keys have no limit: no headers, never a 429.
        other = await c.get("/v1/models", headers=bearer("sk-team-a-0001"))
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers


async def test_tokens_are_reserved_then_settled_to_the_usage():
    limit = 1000
    args = app_args(rate_limits={"tokens_per_minute": limit})
    async with await make_client(args) as c:
        body = chat(max_tokens=32)
        estimate = math.ceil(len("hello there") / 4) + 32
        first = await c.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == limit - estimate
        used = first.json()["usage"]["total_tokens"]
        assert used < estimate  # the fake model's prompt is shorter than the estimate
        second = await c.post("/v1/chat/completions", json=body)
        # The first request's unused tokens were given back before its answer arrived.
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == limit - used - estimate
        # Streams settle too (the ingress asks for the usage chunk, and hides it).
        stream = await c.post("/v1/chat/completions", json={**body, "stream": True})
        assert '"usage":{' not in stream.text.replace(" ", "")
        after = await c.post("/v1/chat/completions", json=body)
        remaining = int(after.headers["x-ratelimit-remaining-tokens"])
        assert remaining == limit - 3 * used - estimate
        too_big = await c.post("/v1/chat/completions", json=chat(max_tokens=limit))
        err = assert_envelope(too_big, 429, "tokens_over_limit")
        assert "retry-after" not in too_big.headers and "fewer max_tokens" in err["message"]


# ------------------------------------------------------------------ metrics
def scrape(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in a Prometheus
    text exposition (0 when absent): other tests in this process may have made samples
    with other label values."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_move_by_exactly_the_requests_made(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", KEYS)
    args = app_args(
        auth={"enabled": True, "keys_env": "TEST_KEYS"},
        rate_limits={"keys": {"limited": {"requests_per_minute": 1}}},
    )
    async with await make_client(args) as c:
        key = bearer("sk-team-a-0001")
        before = (await c.get("/metrics", headers=key)).text
        n = 3
        for _ in range(n):
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=4), headers=key)
            assert r.status_code == 200
        usage = r.json()["usage"]
        await c.get("/v1/models")  # 401
        await c.get("/v1/models", headers=bearer("sk-limited-0002"))
        await c.get("/v1/models", headers=bearer("sk-limited-0002"))  # 429
        after = (await c.get("/metrics", headers=key)).text

    def moved(name, **labels):
        return scrape(after, name, **labels) - scrape(before, name, **labels)

    ok = {"route": "/v1/chat/completions", "model": "fake-llm", "status": "200", "key": "team-a"}
    assert moved("serve_apps_requests_total", **ok) == n
    assert moved("serve_apps_request_duration_seconds_count", route=ok["route"]) == n
    tokens = {"model": "fake-llm", "key": "team-a"}
    assert moved("serve_apps_prompt_tokens_total", **tokens) == n * usage["prompt_tokens"]
    assert moved("serve_apps_generated_tokens_total", **tokens) == n * usage["completion_tokens"]
    assert moved("serve_apps_auth_failures_total", reason="missing_api_key") == 1
    assert moved("serve_apps_rate_limited_total", key="limited", limit="requests") == 1
    assert moved("serve_apps_requests_total", route="unmatched", status="401") == 1
    # Refused before routing: no route template.
    assert moved("serve_apps_requests_total", route="unmatched", status="429", key="limited") == 1


async def test_time_to_first_token_is_observed_for_streams():
    name = "serve_apps_time_to_first_token_seconds_count"
    before = scrape(metrics.render()[0].decode(), name, model="fake-llm")
    async with await make_client(app_args()) as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
        assert r.status_code == 200
    after = scrape(metrics.render()[0].decode(), name, model="fake-llm")
    assert after - before == 1


# ------------------------------------------------------------------ request IDs in logs
async def test_the_request_id_is_on_the_replica_side_log_line(caplog):
    install_log_context()
    with caplog.at_level(logging.INFO, logger="serve_apps.replicas.llm"):
        async with await make_client(app_args()) as c:
            r = await c.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "log-7"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "log-7"
    (line,) = [rec for rec in caplog.records if rec.getMessage().startswith("generation finished")]
    assert line.request_id == "log-7"
    formatted = JSONLogFormatter().format(line)
    assert '"request_id": "log-7"' in formatted and "hello there" not in formatted
