"""The front door on every target: API keys, rate limits, request IDs (auth is on in the
contract app; its keys are in ``tests.conftest.CONTRACT_KEYS``)."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.conftest import CONTRACT_KEYS, CONTRACT_KEYS_FILE
from tests.helpers import assert_envelope

LLM = "smoke-llm"


def key(name):
    return {"Authorization": f"Bearer {CONTRACT_KEYS[name]}"}


def chat(**kw):
    return {"model": LLM, "messages": [{"role": "user", "content": "Say something."}], **kw}


def no_key(api):
    """A client for the same target that sends no key."""
    return httpx.AsyncClient(transport=api.transport_given, base_url=api.base_url, timeout=120)


async def test_no_key_wrong_key_and_revoked_key_are_401_and_the_right_key_200(api):
    async with no_key(api) as anon:
        missing = await anon.get("/v1/models", headers={"x-request-id": "fd-missing-1"})
        err = assert_envelope(missing, 401, "missing_api_key")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers.get_list("x-request-id") == ["fd-missing-1"]
        assert err["request_id"] == "fd-missing-1"
        wrong = await anon.post(
            "/v1/chat/completions", json=chat(max_tokens=2), headers={"x-api-key": "sk-nope"}
        )
        assert_envelope(wrong, 401, "invalid_api_key")
        assert (await anon.get("/v1/models", headers=key("revocable"))).status_code == 200
        original = CONTRACT_KEYS_FILE.read_text()
        try:
            CONTRACT_KEYS_FILE.write_text(
                "".join(line + "\n" for line in original.splitlines() if "revocable" not in line)
            )
            revoked = await anon.get("/v1/models", headers=key("revocable"))
            assert_envelope(revoked, 401, "invalid_api_key")
        finally:
            CONTRACT_KEYS_FILE.write_text(original)
        assert (
            await anon.get("/v1/models", headers={"x-api-key": CONTRACT_KEYS["contract"]})
        ).status_code == 200


async def test_liveness_stays_open_and_readiness_does_not(api):
    async with no_key(api) as anon:
        live = await anon.get("/health", params={"deep": "false"})
        assert live.status_code == 200 and live.json()["status"] == "ok"
        assert_envelope(await anon.get("/health"), 401)


async def test_the_openai_client_with_api_key_works(api):
    import openai

    def http_client():  # the openai client closes it when it is done
        return httpx.AsyncClient(transport=api.transport_given, timeout=120)

    base = f"{api.base_url}".rstrip("/") + "/v1"
    async with openai.AsyncOpenAI(
        api_key=CONTRACT_KEYS["contract"], base_url=base, http_client=http_client()
    ) as client:
        done = await client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens > 0
    async with openai.AsyncOpenAI(
        api_key="sk-wrong", base_url=base, http_client=http_client(), max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list()
        assert info.value.status_code == 401


async def test_requests_past_the_limit_are_429_with_retry_after_and_ratelimit_headers(api):
    # Until the window's requests are used up (remaining 0), then the next is a 429: checked
    # on the headers, so a minute boundary in the middle cannot make it flaky.
    last = None
    for _ in range(12):
        r = await api.get("/v1/models", headers=key("limited"))
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        if r.status_code == 429:
            assert last is not None and last.headers["x-ratelimit-remaining-requests"] == "0"
            err = assert_envelope(r, 429, "rate_limit_exceeded")
            assert 1 <= int(r.headers["retry-after"]) <= 60 and "limited" in err["message"]
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            return
        assert r.status_code == 200
        last = r
    pytest.fail("no 429 after 12 requests at 3 per minute")


async def test_tokens_per_minute_reserve_and_settle(api):
    limit = 400
    too_big = await api.post(
        "/v1/chat/completions", json=chat(max_tokens=401), headers=key("tokens")
    )
    assert_envelope(too_big, 429, "tokens_over_limit")
    assert too_big.headers["x-ratelimit-limit-tokens"] == str(limit)
    body = chat(max_tokens=8, temperature=0)
    estimate = math.ceil(len("Say something.") / 4) + 8
    first = await api.post("/v1/chat/completions", json=body, headers=key("tokens"))
    if first.status_code == 429:  # an earlier run of this test used this minute's tokens
        pytest.skip("the tokens key's window is used up by an earlier run")
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    after_first = int(first.headers["x-ratelimit-remaining-tokens"])
    second = await api.post("/v1/chat/completions", json=body, headers=key("tokens"))
    assert second.status_code == 200
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # Settled: the first request counts what it used (the smoke chat template makes that
    # more than the estimate), not its reservation; or a new window started in between.
    assert used != estimate
    assert remaining in (after_first + estimate - used - estimate, limit - estimate)
