"""``GET /health``: readiness (every service answers) and liveness (``deep=false``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ..errors import UnavailableError, unwrap
from ..registry import AppContext
from ..schemas.openai import HealthResponse

HEALTH_TIMEOUT_S = 10


async def check_services(ctx: AppContext) -> None:
    """Ask every service's health check at once; ``UnavailableError`` naming the ones that
    fail or do not answer within :data:`HEALTH_TIMEOUT_S`."""
    keys = list(ctx.clients)
    results = await asyncio.gather(
        *(asyncio.wait_for(ctx.clients[k].health(), HEALTH_TIMEOUT_S) for k in keys),
        return_exceptions=True,
    )
    failed = {
        k: unwrap(r) for k, r in zip(keys, results, strict=True) if isinstance(r, BaseException)
    }
    if failed:
        silent = f"no answer in {HEALTH_TIMEOUT_S} s"
        reasons = (
            f"{k} ({silent if isinstance(e, TimeoutError) else e})" for k, e in failed.items()
        )
        raise UnavailableError("not ready: " + "; ".join(reasons))


def router(ctx: AppContext) -> APIRouter:
    api = APIRouter(tags=["health"])

    @api.get("/health", response_model=HealthResponse)
    async def health(deep: bool = True) -> HealthResponse:
        """Readiness: every service answers its health check within 10 s (503 naming those
        that do not). ``deep=false``: the ingress alone, a liveness probe that wakes no
        service scaled to zero."""
        if deep:
            await check_services(ctx)
        return HealthResponse(models=sorted(ctx.model_services))

    return api
