"""``POST /v1/detect``, ``/v1/segment``, ``/v1/ground``: the vision routes.

Each route is mounted when the services it needs are configured (an unconfigured route is
a 404 like any unknown route). The work is done by
:class:`serve_apps.pipelines.vision.VisionPipelines`.
"""

from __future__ import annotations

from fastapi import APIRouter

from ..pipelines.vision import VisionPipelines
from ..registry import DETECTOR, GROUNDER, SAM, AppContext
from ..schemas.vision import (
    DetectRequest,
    DetectResponse,
    GroundRequest,
    GroundResponse,
    SegmentRequest,
    SegmentResponse,
)


def router(ctx: AppContext) -> APIRouter:
    pipelines = VisionPipelines(ctx)
    api = APIRouter(tags=["vision"])
    detector, sam, grounder = ctx.client(DETECTOR), ctx.client(SAM), ctx.client(GROUNDER)

    if detector is not None:

        @api.post("/v1/detect", response_model=DetectResponse)
        async def detect(req: DetectRequest) -> DetectResponse:
            return await pipelines.detect(req)

    if sam is not None:

        @api.post("/v1/segment", response_model=SegmentResponse)
        async def segment(req: SegmentRequest) -> SegmentResponse:
            return await pipelines.segment(req)

    if detector is not None and sam is not None and grounder is not None:

        @api.post("/v1/ground", response_model=GroundResponse)
        async def ground(req: GroundRequest) -> GroundResponse:
            return await pipelines.ground(req)

    return api
