"""The HTTP ingress: one FastAPI app, the same on every target.

``create_app(args, handles)`` builds it from the validated config and one
:class:`~serve_apps.handles.Handle` per service. Ray Serve mounts it in the ingress
deployment, Modal serves it with ``@modal.asgi_app()``, tests call it in-process.

Conventions (see docs/architecture.md):

- every 4xx/5xx body is the envelope of :mod:`serve_apps.errors`, including FastAPI's
  validation errors (400, not 422), unknown routes (404) and oversize bodies (413);
- streaming routes settle the status before the first byte (the first chunk is awaited
  first); a later failure is sent in-band as ``data: {"error": ...}``; the stream always
  ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .config import AppArgs
from .errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    ServeAppError,
    UnavailableError,
    UnsupportedError,
    error_body,
    status_of,
    unwrap,
)
from .handles import Handle
from .pipelines.vision import resolve_chat_images
from .schemas.generate import GenerateRequest, GenerateResponse
from .schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from .vision_routes import vision_router

logger = logging.getLogger(__name__)

SERVICE_DESCRIPTIONS = {
    "llm": "chat and completions",
    "codegen": "constrained generation (JSON schema, regex, grammar)",
    "detector": "vision-language model: /v1/detect (Rex-Omni format) and chat with images",
}


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


def _sse(item: BaseModel | dict[str, Any]) -> str:
    data = item.model_dump_json() if isinstance(item, BaseModel) else json.dumps(item)
    return f"data: {data}\n\n"


async def sse_response(stream: AsyncIterator[Any]) -> StreamingResponse:
    """Server-sent events from a handle stream; errors before the first chunk raise."""
    iterator = aiter(stream)
    try:
        first: Any = await anext(iterator)
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            async for item in iterator:
                yield _sse(item)
        except Exception as e:  # in-band: the status line has already gone out
            err = unwrap(e)
            if not isinstance(err, ServeAppError):
                logger.exception("stream failed", exc_info=err)
            yield _sse(error_body(err))
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(args: AppArgs, handles: Mapping[str, Handle]) -> FastAPI:
    """The FastAPI app for ``args``; ``handles`` maps service name -> handle."""
    model_configs = args.model_configs()
    missing = set(args.services()) - set(handles)
    if missing:
        raise ValueError(f"no handle for services {sorted(missing)}")
    by_model = {cfg.served_model_name: service for service, cfg in model_configs.items()}
    created = int(time.time())

    app = FastAPI(title="serve-apps", version=__version__)
    app.add_middleware(BodyLimitMiddleware, limit=args.limits.max_request_bytes)

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

    def route(model: str | None, default: str) -> tuple[str, Handle]:
        if model is None:
            return default, handles[default]
        service = by_model.get(model)
        if service is None:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; available: {sorted(by_model)}", param="model"
            )
        return service, handles[service]

    def check_max_tokens(requested: int | None) -> None:
        if requested is not None and requested > args.limits.max_tokens:
            raise ContextLengthError(
                f"max_tokens {requested} is over this service's limit of {args.limits.max_tokens}",
                param="max_tokens",
            )

    def openai_route(req: SamplingFields, requested: int | None) -> Handle:
        check_max_tokens(requested)
        _, handle = route(req.model, "llm")
        return handle

    # ------------------------------------------------------------------ routes
    @app.get("/health", response_model=HealthResponse)
    async def health(deep: bool = True) -> HealthResponse:
        """Readiness: every service answers its health check within 10 s (503 naming those
        that do not). ``deep=false``: the ingress alone, a liveness probe that wakes no
        service scaled to zero."""
        if deep:
            services = args.services()
            results = await asyncio.gather(
                *(asyncio.wait_for(handles[s].call("health"), timeout=10) for s in services),
                return_exceptions=True,
            )
            failed = {
                s: unwrap(r)
                for s, r in zip(services, results, strict=True)
                if isinstance(r, BaseException)
            }
            if failed:
                raise UnavailableError(
                    "not ready: "
                    + "; ".join(
                        f"{s} ({'no answer in 10 s' if isinstance(e, TimeoutError) else e})"
                        for s, e in failed.items()
                    )
                )
        return HealthResponse(models=sorted(by_model))

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=cfg.served_model_name,
                    created=created,
                    service=service,
                    smoke=cfg.is_smoke,
                    description=(
                        f"{SERVICE_DESCRIPTIONS.get(service, service)}; "
                        + (cfg.smoke_description if cfg.is_smoke else f"model {cfg.model}")
                    ),
                )
                for service, cfg in model_configs.items()
            ]
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        check_max_tokens(req.requested_max_tokens())
        service, handle = route(req.model, "llm")
        if any(m.has_images() for m in req.messages):
            if model_configs[service].modality != "image-text":
                raise UnsupportedError(f"model {req.model} does not take images", param="messages")
            # Fetch image URLs and enforce the image limits here, before any model server.
            await resolve_chat_images(req, args)
        if req.stream:
            return await sse_response(handle.stream("chat_stream", req))
        return await handle.call("chat", req)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(req: CompletionRequest) -> Any:
        handle = openai_route(req, req.requested_max_tokens())
        if req.stream:
            return await sse_response(handle.stream("completion_stream", req))
        return await handle.call("completion", req)

    app.include_router(vision_router(args, handles))

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        check_max_tokens(req.max_tokens)
        _, handle = route(req.model, "codegen")
        return await handle.call("generate", req)

    return app


__all__ = ["create_app", "error_response", "sse_response"]
