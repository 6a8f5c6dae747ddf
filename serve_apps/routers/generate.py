"""``POST /v1/generate``: constrained generation; the codegen service unless ``model`` says."""

from __future__ import annotations

from fastapi import APIRouter

from ..registry import CODEGEN, AppContext
from ..schemas.generate import GenerateRequest, GenerateResponse


async def generate(ctx: AppContext, req: GenerateRequest) -> GenerateResponse:
    ctx.args.limits.check_max_tokens(req.max_tokens)
    key, client = ctx.model_client(req.model, CODEGEN)
    await ctx.reserve_tokens(key, [req.prompt], req.max_tokens)
    return await client.generate(req)


def router(ctx: AppContext) -> APIRouter:
    api = APIRouter(tags=["generate"])

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate_route(req: GenerateRequest) -> GenerateResponse:
        return await generate(ctx, req)

    return api
