"""The front door of the ingress: API keys, per-key rate limits and the request metrics.

:class:`FrontDoorMiddleware` (pure ASGI, inside the ingress's ``RequestContextMiddleware``
so that its refusals carry the request ID) runs for every HTTP request:

1. liveness (``GET /health?deep=false``) passes untouched: no key, no limit;
2. with ``auth.enabled``, the key (``Authorization: Bearer``, ``x-api-key``) is checked
   (:mod:`serve_apps.auth`): 401 + ``WWW-Authenticate`` when missing or unknown; its name
   goes into the request's :class:`~serve_apps.request_context.RequestMeta` (logs, replicas);
3. with rate limits, one request is counted against the key's requests per minute (429 +
   ``Retry-After`` when over); every response then carries OpenAI's ``x-ratelimit-*``
   headers. Generation routes reserve tokens (:func:`reserve_tokens`) and the usage the
   client saw settles them (:func:`record_usage`) when the response has ended;
4. every response is counted (route template, model, status, key name) and timed.

Routes and clients reach the request's :class:`Visit` through a context variable.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .auth import KeyStore, bearer_key
from .config import AuthConfig, KeyLimits, RateLimits
from .errors import RateLimitedError, ServeAppError, UnauthorizedError
from .ratelimit import Decision, SharedCounters, estimate_tokens, local_counters, ratelimit_headers
from .request_context import bind, current

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


@dataclass
class Visit:
    """One request as the front door sees it; routes and clients add to it."""

    started: float
    key: str = ANONYMOUS
    limits: KeyLimits | None = None
    counters: SharedCounters | None = None
    decision: Decision | None = None
    model: str = ""
    reserved: int = 0
    reserved_window: float = 0.0
    used: int | None = None
    first_token_seen: bool = False
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


_visit: ContextVar[Visit | None] = ContextVar("serve_apps_visit", default=None)


def visit() -> Visit | None:
    return _visit.get()


def record_model(model: str) -> None:
    """The served model this request is for (the ``model`` label)."""
    v = _visit.get()
    if v is not None:
        v.model = model


async def reserve_tokens(prompt_chars: int, max_tokens: int) -> None:
    """Reserve the request's tokens against its key's tokens per minute; 429 when they do
    not fit. A no-op without a token limit."""
    v = _visit.get()
    if v is None or v.counters is None or v.limits is None or not v.limits.tokens_per_minute:
        return
    amount = estimate_tokens(prompt_chars, max_tokens)
    decision = await v.counters.reserve(v.key, v.limits, amount)
    v.decision = decision
    if not decision.allowed:
        raise _refusal(v, decision, amount)
    assert decision.tokens is not None
    v.reserved, v.reserved_window = amount, decision.tokens.reset_at


def record_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """A generation's usage: token metrics, and what settles the reservation."""
    v = _visit.get()
    labels = {"model": v.model if v else "", "key": v.key if v else ANONYMOUS}
    metrics.inc(metrics.PROMPT_TOKENS, prompt_tokens, **labels)
    metrics.inc(metrics.GENERATED_TOKENS, completion_tokens, **labels)
    if v is not None:
        v.used = (v.used or 0) + prompt_tokens + completion_tokens


def record_first_token() -> None:
    """A stream's first chunk reached the ingress: time to first token."""
    v = _visit.get()
    if v is not None and not v.first_token_seen:
        v.first_token_seen = True
        metrics.observe(metrics.TIME_TO_FIRST_TOKEN, time.perf_counter() - v.started, model=v.model)


def _refusal(v: Visit, decision: Decision, amount: int | None = None) -> RateLimitedError:
    which = decision.refused or "requests"
    metrics.inc(metrics.RATE_LIMITED, key=v.key, limit=which)
    window = decision.tokens if which == "tokens" else decision.requests
    limit = window.limit if window else 0
    if decision.retry_after_s is None:
        return RateLimitedError(
            f"this request needs about {amount} tokens, more than the {limit} tokens per "
            f"minute of API key {v.key!r}; ask for fewer max_tokens",
            code="tokens_over_limit",
        )
    return RateLimitedError(
        f"API key {v.key!r} is over its limit of {limit} {which} per minute; retry after "
        "Retry-After seconds",
        retry_after_s=max(decision.retry_after_s, 1.0),
    )


def _is_liveness(scope: Scope) -> bool:
    if scope.get("path") != "/health" or scope.get("method") not in ("GET", "HEAD"):
        return False
    query = scope.get("query_string", b"").decode("latin-1").lower()
    return any(p in ("deep=false", "deep=0", "deep=no", "deep=off") for p in query.split("&"))


class FrontDoorMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        auth: AuthConfig,
        rate_limits: RateLimits,
        counters: SharedCounters | None = None,
    ):
        self.app = app
        self.keys = KeyStore(auth) if auth.enabled else None
        self.rate_limits = rate_limits
        self.counters = (counters or local_counters(rate_limits)) if rate_limits.enabled else None
        if self.keys is None:
            logger.warning(
                "auth is off: every route answers without an API key (set auth.enabled and "
                "a keys secret in production)"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_liveness(scope):
            await self.app(scope, receive, send)
            return
        v = Visit(started=time.perf_counter())
        token = _visit.set(v)
        status = 499  # nginx's "client closed request": no response was started
        finished = False

        async def finish() -> None:
            # Before the response's last byte leaves: a client that has its answer finds
            # the tokens settled and the request counted.
            nonlocal finished
            if not finished:
                finished = True
                await self._settle(v)
                self._count(scope, v, status)

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if v.decision is not None:
                    headers = [*message.get("headers", []), *ratelimit_headers(v.decision)]
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await finish()
            await send(message)

        try:
            error = await self._admit(scope, v)
            if error is not None:
                from .ingress import error_response

                await error_response(error)(scope, receive, send_with_headers)
            elif self.keys is not None and (meta := current()) is not None:
                with bind(replace(meta, key_name=v.key)):
                    await self.app(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            _visit.reset(token)
            await finish()  # no last byte went out (the client left, a failure)

    @staticmethod
    def _count(scope: Scope, v: Visit, status: int) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        metrics.inc(metrics.REQUESTS, route=route, model=v.model, status=status, key=v.key)
        latency = time.perf_counter() - v.started
        metrics.observe(metrics.REQUEST_LATENCY, latency, route=route, status=status)

    async def _admit(self, scope: Scope, v: Visit) -> ServeAppError | None:
        if self.keys is not None:
            headers = dict(scope.get("headers") or [])
            try:
                v.key = self.keys.authenticate(
                    bearer_key(headers.get(b"authorization"), headers.get(b"x-api-key"))
                )
            except UnauthorizedError as e:
                metrics.inc(metrics.AUTH_FAILURES, reason=e.code)
                return e
        if self.counters is not None:
            v.limits, v.counters = self.rate_limits.for_key(v.key), self.counters
            v.decision = await self.counters.admit(v.key, v.limits)
            if not v.decision.allowed:
                return _refusal(v, v.decision)
        return None

    async def _settle(self, v: Visit) -> None:
        if not v.reserved or v.used is None or v.counters is None or v.limits is None:
            return  # nothing reserved, or no usage known: the reservation stands
        delta = v.used - v.reserved
        if delta:
            try:
                await v.counters.settle(v.key, v.limits, delta, v.reserved_window)
            except Exception:  # the reservation stands
                logger.exception("could not settle a token reservation")
