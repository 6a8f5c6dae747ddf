"""The HTTP ingress: one FastAPI app, the same on every target.

``create_app(args, handles)`` builds it from the validated config and one
:class:`~serve_apps.handles.Handle` per service: middleware, the one error map, and the
routers (:mod:`serve_apps.routers`) of the services the config turns on. Ray Serve mounts
it in the ingress deployment, Modal serves it with ``@modal.asgi_app()``, tests call it
in-process.

Every 4xx/5xx body is the envelope of :mod:`serve_apps.errors`, including FastAPI's
validation errors (400, not 422), unknown routes (404) and oversize bodies (413).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, metrics
from .config import Limits
from .errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServeAppError,
    error_body,
    error_headers,
    status_of,
    unwrap,
    validation_error,
)
from .front_door import FrontDoorMiddleware
from .handles import Handle
from .ratelimit import SharedCounters
from .registry import AppArgsBase, AppContext
from .request_context import RequestMeta, bind, current, new_request_id
from .schemas.common import ErrorResponse

logger = logging.getLogger(__name__)


def error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    if not isinstance(exc, ServeAppError):
        logger.exception("unhandled error", exc_info=exc)
    meta = current()
    return JSONResponse(
        error_body(exc, meta.request_id if meta else None),
        status_code=status_of(exc),
        headers=error_headers(exc),
    )


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear, no backtracking
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))


def json_deeper_than(body: bytes, limit: int) -> bool:
    """Whether a JSON text nests arrays/objects deeper than ``limit``, found with C-speed
    byte operations (no parse: a parser would recurse as deep as the text does, and so
    would pickling it on the way to a replica)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        # Strip innermost pairs: each round removes one level of nesting.
        shorter = _INNERMOST.sub(b"", brackets)
        if shorter == brackets:  # not balanced: the JSON parser will say what is wrong
            return False
        brackets = shorter
    return bool(brackets)


class BodyMiddleware:
    """Reads the request body once, within its limits, and replays it to the app (pure
    ASGI; every route parses the whole JSON body anyway): 413 over ``max_request_bytes``
    or the path's ``route_max_request_bytes`` (declared or streamed), 408 when it does
    not arrive within ``body_timeout_s``, 400 when a JSON body nests deeper than
    ``max_json_depth``."""

    def __init__(self, app: ASGIApp, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit = self.limits.max_bytes_for(scope.get("path", ""))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(self._too_large(limit), scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                body = await self._read(receive, limit)
        except TimeoutError:
            timeout = self.limits.body_timeout_s
            error: ServeAppError = RequestTimeoutError(f"request body not received in {timeout} s")
            await self._refuse(error, scope, receive, send)
            return
        except PayloadTooLargeError as e:
            await self._refuse(e, scope, receive, send)
            return
        if body is None:  # the client went away
            return
        json_body = b"json" in headers.get(b"content-type", b"json")
        if json_body and json_deeper_than(body, self.limits.max_json_depth):
            error = InvalidRequestError(
                f"the JSON body nests deeper than {self.limits.max_json_depth} levels",
                code="invalid_json",
            )
            await self._refuse(error, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large(limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"request body is over the {limit}-byte limit")

    async def _read(self, receive: Receive, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(error: ServeAppError, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(error)(scope, receive, send)


# A client's request ID is kept when it is a plain token (it goes into logs and headers).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMEOUT_HEADER = b"x-request-timeout"


class RequestContextMiddleware:
    """Makes each request's :class:`RequestMeta` (pure ASGI, outermost).

    Its ID is the client's ``x-request-id`` when that is a plain token, else a new one,
    and every response carries it back in ``x-request-id``. Its deadline is now plus the
    route's timeout (``limits.route_timeouts_s``, else ``limits.request_timeout_s``), or
    sooner when the client's ``x-request-timeout`` header (seconds) says so; the clients
    of the services enforce it (504).
    """

    def __init__(self, app: ASGIApp, limits: Limits, echo_adopted_id: bool = True):
        self.app = app
        self.limits = limits
        # False behind Ray Serve's proxy, which returns the request's x-request-id itself
        # (the one it put into the request, which this adopts): one header, not two.
        self.echo_adopted_id = echo_adopted_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        timeout = self.limits.timeout_for(scope.get("path", ""))
        try:
            asked = float(headers.get(TIMEOUT_HEADER, b"inf"))
        except ValueError:
            asked = math.inf  # not a number: the route's own timeout
        if asked > 0:
            timeout = min(timeout, asked)
        meta = RequestMeta(
            request_id=given if _REQUEST_ID.fullmatch(given) else new_request_id(),
            deadline=time.time() + timeout,
        )

        echo = self.echo_adopted_id or meta.request_id != given

        async def send_with_id(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", meta.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with bind(meta):
            await self.app(scope, receive, send_with_id)


HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """The one map from exceptions to the error envelope, for every route of ``app``."""

    @app.exception_handler(ServeAppError)
    async def _our_error(_: Request, exc: ServeAppError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own: unknown route (404), wrong method (405, with Allow), a body
        # FastAPI could not decode (400: not UTF-8, which JSON must be).
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "not_found_error" if exc.status_code == 404 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


# What any route may answer besides its 200, all in the envelope: the body checks (400,
# 408, 413), a model the request names that is not served (404), the deadline (504), a
# service overloaded or gone (503), and a fault of ours (500).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request (the error envelope; param names the field)",
        401: "no API key, or not a valid one (auth on)",
        404: "unknown model or route",
        408: "request body not received in time",
        413: "request body or image too large",
        429: "over the API key's requests or tokens per minute; retry after Retry-After",
        500: "internal error",
        503: "overloaded or unavailable; retry after Retry-After seconds",
        504: "deadline exceeded; retry after Retry-After seconds",
    }.items()
}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema without its 422s: validation errors are 400s in the envelope."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def metrics_router() -> APIRouter:
    """``GET /metrics``: this process's metrics for Prometheus, where Ray's exporter is not
    there (in-process, Modal). It needs an API key like every route when auth is on."""
    api = APIRouter(tags=["metrics"])

    @api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return api


def create_app(
    args: AppArgsBase,
    handles: Mapping[str, Handle],
    *,
    counters: SharedCounters | None = None,
    echo_adopted_id: bool = True,
) -> FastAPI:
    """The FastAPI app for ``args``; ``handles`` maps service key -> handle. ``counters``:
    where the rate limits count (default: this process, or ``rate_limits.storage``);
    ``echo_adopted_id``: see :class:`RequestContextMiddleware` (False on Ray Serve)."""
    ctx = AppContext.from_handles(args, handles)
    app = FastAPI(title="serve-apps", version=__version__)
    app.add_middleware(BodyMiddleware, limits=args.limits)
    app.add_middleware(
        FrontDoorMiddleware, auth=args.auth, rate_limits=args.rate_limits, counters=counters
    )
    app.add_middleware(  # added last: outermost
        RequestContextMiddleware, limits=args.limits, echo_adopted_id=echo_adopted_id
    )
    install_error_handlers(app)
    for router in ctx.routers():
        app.include_router(router, responses=ERROR_RESPONSES)
    if metrics.exports_http():
        app.include_router(metrics_router())
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


__all__ = ["create_app", "error_response", "install_error_handlers"]
