"""What travels with a request from the ingress to every replica it reaches.

The ingress makes one :class:`RequestMeta` per HTTP request (its ID, its deadline, the
name of the API key it came with) and binds it to the request's task with :func:`bind`.
Every handle carries the bound value across its hop and binds it again on the replica
side (Ray: ``Replica.invoke``; Modal: ``ServerHost.call``; in-process, context
variables flow by themselves), so model code anywhere in the graph can read it with
:func:`current`: log lines carry the request ID, engines drop work whose deadline passed.
"""

from __future__ import annotations

import json
import logging
import threading
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


# --------------------------------------------------------------------------- logs
_factory_lock = threading.Lock()
_installed = False


def install_log_context() -> None:
    """Give every log record made while a request is bound its ``request_id`` and
    ``api_key_name`` (the key's name, never the key), in this process, once.

    Done with a log-record factory rather than a filter, so records of every logger have
    them whatever handler formats them: Ray Serve's JSON log lines on Ray (which also
    carry Serve's own ``request_id``, the same value: Serve's proxy puts its ID into the
    request's ``x-request-id``, which the ingress adopts), :class:`JSONLogFormatter` on
    Modal, any format string naming ``%(request_id)s`` elsewhere.
    """
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            meta = _current.get()
            if meta is not None:
                record.request_id = meta.request_id
                if meta.key_name is not None:
                    record.api_key_name = meta.key_name
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


class JSONLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request's
    ``request_id`` / ``api_key_name`` when it has them (Modal's log view, any collector)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for attr in ("request_id", "api_key_name"):
            if hasattr(record, attr):
                line[attr] = getattr(record, attr)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line)


def log_json_to_stderr(logger_name: str = "serve_apps") -> None:
    """Our package's logs as JSON lines on stderr, with the request's fields (Modal)."""
    install_log_context()
    logger = logging.getLogger(logger_name)
    if not any(isinstance(h.formatter, JSONLogFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JSONLogFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
