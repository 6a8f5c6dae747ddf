"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Requests are routed by their ``model`` field (a service's ``served_model_name``, or the
name of one of its LoRA adapters, which the same service serves). Every
OpenAI parameter is either served (``n``, ``logprobs``/``top_logprobs``, the penalties,
``stream_options``, ``response_format``, ``tools``/``tool_choice``: see
:mod:`serve_apps.tools`) or, when set, a 400 naming it
(:data:`serve_apps.schemas.openai.UNSUPPORTED_PARAMS`); unknown fields are tolerated. Chat
messages with images go only to image-text models; the ingress fetches and checks every
image first (:func:`serve_apps.pipelines.vision.resolve_chat_images`), so a model server
only ever sees ``data:`` URLs within the limits.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from ..errors import UnsupportedError
from ..pipelines.vision import resolve_chat_images
from ..registry import LLM, AppContext
from ..schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from .streaming import sse_response


def list_models(ctx: AppContext, created: int) -> ModelList:
    """One card per LLM-style service (its name, service, and what model it is), then one
    per adapter of it (served by the same service)."""
    specs = {s.key: s for s, _ in ctx.args.enabled()}
    cards: list[ModelCard] = []
    for key, cfg in ctx.args.model_configs().items():
        cards.append(
            ModelCard(
                id=cfg.served_model_name,
                created=created,
                service=key,
                smoke=cfg.is_smoke,
                description=f"{specs[key].description}; "
                + (cfg.smoke_description if cfg.is_smoke else f"model {cfg.model}"),
            )
        )
        cards += [
            ModelCard(
                id=adapter.name,
                created=created,
                service=key,
                smoke=adapter.is_smoke,
                description=f"{specs[key].description} with an adapter of "
                f"{cfg.served_model_name}; {adapter.description}",
            )
            for adapter in cfg.adapters
        ]
    return ModelList(data=cards)


async def chat_completions(ctx: AppContext, req: ChatCompletionRequest) -> Any:
    req.check_supported()
    ctx.args.limits.check_max_tokens(req.requested_max_tokens())
    key, client = ctx.model_client(req.model, LLM)
    await ctx.reserve_tokens(key, [m.text() for m in req.messages], req.requested_max_tokens())
    if any(m.has_images() for m in req.messages):
        if ctx.args.model_configs()[key].modality != "image-text":
            raise UnsupportedError(f"model {req.model} does not take images", param="messages")
        # Fetch image URLs and enforce the image limits here, before any model server.
        await resolve_chat_images(req, ctx.args.images)
    if req.stream:
        return await sse_response(client.chat_stream(req))
    return await client.chat(req)


async def completions(ctx: AppContext, req: CompletionRequest) -> Any:
    req.check_supported()
    ctx.args.limits.check_max_tokens(req.requested_max_tokens())
    key, client = ctx.model_client(req.model, LLM)
    await ctx.reserve_tokens(key, [req.prompt_text()], req.requested_max_tokens())
    if req.stream:
        return await sse_response(client.completion_stream(req))
    return await client.completion(req)


# With "stream": true the 200 is server-sent events (routers.streaming).
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
}


def router(ctx: AppContext) -> APIRouter:
    api = APIRouter(tags=["openai"])
    created = int(time.time())

    @api.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return list_models(ctx, created)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
    async def chat(req: ChatCompletionRequest) -> Any:
        return await chat_completions(ctx, req)

    @api.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
    async def completion(req: CompletionRequest) -> Any:
        return await completions(ctx, req)

    return api
