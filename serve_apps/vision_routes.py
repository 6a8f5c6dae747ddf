"""``POST /v1/detect``, ``/v1/segment``, ``/v1/ground``: the vision routes of the ingress.

Mounted by :func:`serve_apps.ingress.create_app` when the services a route needs are
configured (an unconfigured route is a 404 like any unknown route). The work is done by
:class:`serve_apps.pipelines.vision.VisionPipelines`; errors take the shared envelope
through the app's exception handlers.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter

from .config import AppArgs
from .handles import Handle
from .pipelines.vision import VisionPipelines
from .schemas.vision import (
    DetectRequest,
    DetectResponse,
    GroundRequest,
    GroundResponse,
    SegmentRequest,
    SegmentResponse,
)


def vision_router(args: AppArgs, handles: Mapping[str, Handle]) -> APIRouter:
    pipelines = VisionPipelines(args, handles)
    router = APIRouter(tags=["vision"])
    if "detector" in handles:

        @router.post("/v1/detect", response_model=DetectResponse)
        async def detect(req: DetectRequest) -> DetectResponse:
            return await pipelines.detect(req)

    if "sam" in handles:

        @router.post("/v1/segment", response_model=SegmentResponse)
        async def segment(req: SegmentRequest) -> SegmentResponse:
            return await pipelines.segment(req)

    if {"grounder", "detector", "sam"} <= set(handles):

        @router.post("/v1/ground", response_model=GroundResponse)
        async def ground(req: GroundRequest) -> GroundResponse:
            return await pipelines.ground(req)

    return router
