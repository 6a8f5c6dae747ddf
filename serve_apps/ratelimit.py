"""Per-key rate limits: requests and tokens per minute, like OpenAI's.

The counting is the ``limits`` library's fixed-window strategy (one window a minute per
key and kind). :class:`Counters` holds one ``limits`` storage and does each step of a
request in one call:

- :meth:`Counters.admit` when a request arrives: one request counted (429 once the key
  is over its requests per minute), and both windows' state for the response headers;
- :meth:`Counters.reserve` when a generation route knows its request: prompt (estimated,
  4 characters a token) + ``max_tokens`` counted against tokens per minute (429 when they
  do not fit);
- :meth:`Counters.settle` when it ends: the count becomes what the request used (the
  unused part given back, a use over the estimate added), only within the same window (a
  new window starts from zero anyway).

Where the counters live decides whether several ingress replicas share them
(``rate_limits.storage``): in the process (in-process, one Modal container), in one named
Ray actor that every ingress replica of the application calls (Ray Serve's ``auto``: one
actor call per step), or in any storage the ``limits`` library reaches by URI (Redis,
Memcached: several Modal containers).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .config import KeyLimits, RateLimits

WINDOW_S = 60


@dataclass(frozen=True)
class Window:
    """One limit's state: what the ``x-ratelimit-*`` headers say."""

    limit: int
    remaining: int
    reset_at: float  # time.time() when the window starts again

    def reset_in(self, now: float | None = None) -> float:
        return max(0.0, self.reset_at - (time.time() if now is None else now))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    requests: Window | None = None
    tokens: Window | None = None
    # When refused: which limit ("requests" or "tokens") and when to retry.
    refused: str | None = None
    retry_after_s: float | None = None


def format_reset(seconds: float) -> str:
    """OpenAI's form of the reset headers: ``1s``, ``6m0s``."""
    whole = max(1, math.ceil(seconds))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def ratelimit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers."""
    headers: list[tuple[bytes, bytes]] = []
    now = time.time()
    for kind, window in (("requests", decision.requests), ("tokens", decision.tokens)):
        if window is None:
            continue
        headers += [
            (f"x-ratelimit-limit-{kind}".encode(), str(window.limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(window.remaining).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), format_reset(window.reset_in(now)).encode()),
        ]
    return headers


class Counters:
    """The windows of every key in one ``limits`` storage (see the module docstring).

    Plain synchronous code: it runs in the ingress process or inside the shared Ray actor,
    where calls run one at a time, so each step is atomic there.
    """

    def __init__(self, storage_uri: str = "memory://"):
        from limits import RateLimitItemPerMinute
        from limits.storage import storage_from_string
        from limits.strategies import FixedWindowRateLimiter

        self._item = RateLimitItemPerMinute
        from limits.storage import Storage

        storage = storage_from_string(storage_uri)
        if not isinstance(storage, Storage):
            raise ValueError(f"rate_limits.storage {storage_uri!r} is not a synchronous storage")
        self._storage = storage
        self._limiter = FixedWindowRateLimiter(self._storage)

    def _window(self, amount: int, *ids: str) -> Window:
        reset_at, remaining = self._limiter.get_window_stats(self._item(amount), *ids)
        return Window(amount, max(0, remaining), reset_at)

    def _peek(self, key: str, limits: KeyLimits) -> tuple[Window | None, Window | None]:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        return (
            self._window(rpm, key, "requests") if rpm else None,
            self._window(tpm, key, "tokens") if tpm else None,
        )

    def _take(self, amount: int, cost: int, *ids: str) -> bool:
        """Count ``cost`` when it fits; a refusal counts nothing (``limits``' own ``hit``
        would count it anyway, and a refused reservation must not use up tokens)."""
        item = self._item(amount)
        if not self._limiter.test(item, *ids, cost=cost):
            return False
        return cost == 0 or self._limiter.hit(item, *ids, cost=cost)

    def admit(self, key: str, limits: KeyLimits) -> Decision:
        rpm = limits.requests_per_minute
        allowed = rpm is None or self._take(rpm, 1, key, "requests")
        requests, tokens = self._peek(key, limits)
        if allowed:
            return Decision(True, requests, tokens)
        assert requests is not None
        return Decision(False, requests, tokens, "requests", requests.reset_in())

    def reserve(self, key: str, limits: KeyLimits, amount: int) -> Decision:
        tpm = limits.tokens_per_minute
        allowed = tpm is None or self._take(tpm, amount, key, "tokens")
        requests, tokens = self._peek(key, limits)
        if allowed:
            return Decision(True, requests, tokens)
        assert tokens is not None
        if amount > tokens.limit:
            # Never fits: a retry would not help either; the message says so.
            return Decision(False, requests, tokens, "tokens", None)
        return Decision(False, requests, tokens, "tokens", tokens.reset_in())

    def settle(self, key: str, limits: KeyLimits, delta: int, window_reset_at: float) -> None:
        """Correct a reservation by ``delta`` = used - reserved tokens."""
        tpm = limits.tokens_per_minute
        if not tpm or delta == 0:
            return
        item = self._item(tpm)
        reset_at, _ = self._limiter.get_window_stats(item, key, "tokens")
        if reset_at != window_reset_at:
            return  # the reservation's window is over
        counter_key = item.key_for(key, "tokens")
        if delta < 0:
            delta = -min(-delta, self._storage.get(counter_key))
        self._storage.incr(counter_key, WINDOW_S, delta)

    def reset(self) -> None:
        self._storage.reset()


class SharedCounters(Protocol):
    """What the ingress calls: :class:`Counters`' steps, awaited (they may be remote)."""

    async def admit(self, key: str, limits: KeyLimits) -> Decision: ...

    async def reserve(self, key: str, limits: KeyLimits, amount: int) -> Decision: ...

    async def settle(
        self, key: str, limits: KeyLimits, delta: int, window_reset_at: float
    ) -> None: ...


class LocalCounters:
    """:class:`Counters` in this process. A storage reached over the network (a ``limits``
    URI) is called from a worker thread, so it never blocks the event loop."""

    def __init__(self, storage_uri: str = "memory://"):
        self.counters = Counters(storage_uri)
        self._threaded = not storage_uri.startswith("memory://")

    async def _run(self, method: Any, *args: Any) -> Any:
        if self._threaded:
            return await asyncio.to_thread(method, *args)
        return method(*args)

    async def admit(self, key: str, limits: KeyLimits) -> Decision:
        decision: Decision = await self._run(self.counters.admit, key, limits)
        return decision

    async def reserve(self, key: str, limits: KeyLimits, amount: int) -> Decision:
        decision: Decision = await self._run(self.counters.reserve, key, limits, amount)
        return decision

    async def settle(self, key: str, limits: KeyLimits, delta: int, window_reset_at: float) -> None:
        await self._run(self.counters.settle, key, limits, delta, window_reset_at)


def local_counters(config: RateLimits) -> LocalCounters:
    """The counters of a target without Ray: ``auto`` and ``memory`` are this process's."""
    uri = "memory://" if config.storage in ("auto", "memory") else config.storage
    return LocalCounters(uri)


def estimate_tokens(text_chars: int, max_tokens: int) -> int:
    """What a generation request reserves: its prompt at 4 characters a token (OpenAI
    estimates the same way before tokenizing), plus the tokens it may generate."""
    return math.ceil(text_chars / 4) + max_tokens
