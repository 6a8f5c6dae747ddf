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

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    ServeAppError,
    error_body,
    status_of,
    unwrap,
)
from .handles import Handle
from .registry import AppArgsBase, AppContext
from .request_context import RequestMeta, bind, new_request_id

logger = logging.getLogger(__name__)


def error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    if not isinstance(exc, ServeAppError):
        logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body(exc), status_code=status_of(exc))


class BodyLimitMiddleware:
    """413 for request bodies over ``limit`` bytes, declared or streamed (pure ASGI).

    The body is read here, at most ``limit`` bytes of it, and replayed to the app: every
    route parses the whole JSON body anyway.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            PayloadTooLargeError(f"request body is over the {self.limit}-byte limit")
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)


# A client's request ID is kept when it is a plain token (it goes into logs and headers).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContextMiddleware:
    """Makes each request's :class:`RequestMeta` (pure ASGI, outermost): its ID is the
    client's ``x-request-id`` when that is a plain token, else a new one, and every
    response carries it back in ``x-request-id``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        meta = RequestMeta(request_id=given if _REQUEST_ID.fullmatch(given) else new_request_id())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", meta.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with bind(meta):
            await self.app(scope, receive, send_with_id)


def install_error_handlers(app: FastAPI) -> None:
    """The one map from exceptions to the error envelope, for every route of ``app``."""

    @app.exception_handler(ServeAppError)
    async def _our_error(_: Request, exc: ServeAppError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(
                InvalidRequestError(
                    f"request body is not valid JSON: {errors[0].get('msg', '')}",
                    code="invalid_json",
                )
            )

        def where(e: Any) -> str:
            return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

        message = "; ".join(f"{where(e) or 'body'}: {e.get('msg')}" for e in errors)
        param = where(errors[0]) if errors else None
        return error_response(
            InvalidRequestError(message, param=param or None, code="invalid_value")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "not_found_error" if exc.status_code == 404 else "invalid_request_error",
                "param": None,
                "code": str(exc.status_code),
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


def create_app(args: AppArgsBase, handles: Mapping[str, Handle]) -> FastAPI:
    """The FastAPI app for ``args``; ``handles`` maps service key -> handle."""
    ctx = AppContext.from_handles(args, handles)
    app = FastAPI(title="serve-apps", version=__version__)
    app.add_middleware(BodyLimitMiddleware, limit=args.limits.max_request_bytes)
    app.add_middleware(RequestContextMiddleware)  # added last: outermost
    install_error_handlers(app)
    for router in ctx.routers():
        app.include_router(router)
    return app


__all__ = ["create_app", "error_response", "install_error_handlers"]
