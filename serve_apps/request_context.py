"""What travels with a request from the ingress to every replica it reaches.

The ingress makes one :class:`RequestMeta` per HTTP request (its ID, its deadline, the
name of the API key it came with) and binds it to the request's task with :func:`bind`.
Every handle carries the bound value across its hop and binds it again on the replica
side (Ray: ``Replica.invoke``; Modal: ``ServerHost.call``; in-process, context
variables flow by themselves), so model code anywhere in the graph can read it with
:func:`current`: log lines carry the request ID, engines drop work whose deadline passed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RequestMeta:
    """A request's identity and budget; plain data, so it pickles across any hop."""

    request_id: str = field(default_factory=new_request_id)
    # Absolute wall-clock time (time.time()) by which the answer is due; None: no deadline.
    deadline: float | None = None
    # The name the front door gave the caller's API key (never the key itself).
    key_name: str | None = None

    def remaining(self) -> float | None:
        """Seconds left until the deadline (negative once it passed); None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0


_current: ContextVar[RequestMeta | None] = ContextVar("serve_apps_request", default=None)


def current() -> RequestMeta | None:
    """The request being served by this task, if any."""
    return _current.get()


@contextmanager
def bind(meta: RequestMeta | None) -> Iterator[None]:
    """Make ``meta`` the current request for the code inside (and the tasks it starts)."""
    token = _current.set(meta)
    try:
        yield
    finally:
        # ValueError: an async generator closed from another task's context (a client
        # went away); that context ends with its task, there is nothing to restore.
        with suppress(ValueError):
            _current.reset(token)
