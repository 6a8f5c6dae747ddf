"""The vision pipelines, written once for every target. They run in the ingress and reach
the detector, SAM and the grounder only through their typed clients (:mod:`serve_apps.clients`).

- detect:  image -> Detector.detect
- segment: image + boxes -> SAM.segment
           image + categories -> Detector.detect -> SAM.segment(boxes), while SAM.encode
           runs alongside the detection
- ground:  image + caption -> Grounder.phrases -> Detector.detect(phrases) -> SAM.segment,
           while SAM.encode runs alongside both

The image is fetched (``image_url``), checked against the limits and decoded here once;
the services receive the validated file bytes (much smaller than pixels on the wire) and
decode what they need. Starting ``SAM.encode`` before the boxes are known puts the
expensive part of SAM (the image encoder) in parallel with the detector, on its own
deployment; ``SAM.segment`` then finds the embedding cached (or joins the encoding still
in progress) and only runs the mask decoder. With several SAM replicas the two calls can
land on different replicas; the result is the same, the head start is then lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ..clients import DetectorClient, SegmenterClient
from ..config import ImageLimits
from ..errors import ImageError
from ..registry import DETECTOR, GROUNDER, SAM, AppContext
from ..schemas.vision import (
    DetectCall,
    DetectRequest,
    DetectResponse,
    DetectResult,
    EncodeResult,
    GroundAnnotation,
    GroundRequest,
    GroundResponse,
    ImageRequest,
    Mask,
    PhraseResult,
    SAMResult,
    SegmentRequest,
    SegmentResponse,
    SegmentResult,
    Shape,
)
from ..timing import elapsed_ms
from ..vision_checks import check_box_count, check_caption, check_category, validate_categories

if TYPE_CHECKING:
    from PIL import Image

    from ..schemas.openai import ChatCompletionRequest, ContentPart
    from .visualize import Overlay

T = TypeVar("T")


def _flat(shape: Shape) -> list[float]:
    """Coordinates of a box or point (flat); polygons are never asked of the detector."""
    return [float(v) for v in shape.coords if not isinstance(v, list)]


async def _timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = await awaitable
    return result, elapsed_ms(t0)


async def _encode(sam: SegmenterClient, data: bytes) -> tuple[EncodeResult, float]:
    # The call is made inside the task, so a task cancelled before it starts leaves no
    # un-awaited coroutine behind.
    return await _timed(sam.encode(data))


def _service_times(timings: dict[str, float], stage: str, measured: dict[str, float]) -> None:
    """The replica's own service time of ``stage`` (``serve_apps.service_time``), if sent."""
    for key in ("service", "service_cpu"):
        if key in measured:
            timings[f"{stage}_{key}"] = measured[key]


def _total_service(timings: dict[str, float], extra_wall_ms: float = 0.0) -> None:
    """The request's service time: the sum of its calls' (``<stage>_service`` and
    ``<stage>_service_cpu``), plus ``extra_wall_ms`` of calls timed only by the caller."""
    stages = [k for k in timings if k.endswith("_service")]
    if stages or extra_wall_ms:
        timings["service"] = round(sum(timings[k] for k in stages) + extra_wall_ms, 3)
        timings["service_cpu"] = round(sum(timings.get(f"{k}_cpu", 0.0) for k in stages), 3)


class VisionPipelines:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.args = ctx.args

    def _max_boxes(self) -> int:
        sam = self.ctx.config(SAM)
        assert sam is not None
        return sam.max_boxes

    # ---------------------------------------------------------------- image
    async def load_image(
        self, req: ImageRequest, timings: dict[str, float]
    ) -> tuple[bytes, Image.Image]:
        """The request's image: bytes (limits checked) and pixels (decoded once, here)."""
        from ..images import decode_image, resolve_image

        limits = self.args.images
        t0 = time.perf_counter()
        data = await resolve_image(req.image, req.image_url, limits)
        if req.image_url is not None and not req.image_url.startswith("data:"):
            timings["fetch"] = elapsed_ms(t0)
        t0 = time.perf_counter()
        image = await asyncio.to_thread(
            decode_image, data, limits.max_image_pixels, "image" if req.image else "image_url"
        )
        timings["decode"] = elapsed_ms(t0)
        return data, image

    async def _overlay(
        self, image: Image.Image, overlay: Overlay, timings: dict[str, float]
    ) -> str:
        from .visualize import render_png

        t0 = time.perf_counter()
        png = await asyncio.to_thread(render_png, image, overlay)
        timings["visualize"] = elapsed_ms(t0)
        return png

    # --------------------------------------------------------------- detect
    async def detect(self, req: DetectRequest) -> DetectResponse:
        from .visualize import Overlay

        t_start = time.perf_counter()
        detector = self.ctx.require(DETECTOR, "/v1/detect")
        categories = self._check_detection(req.categories, req.max_tokens)
        timings: dict[str, float] = {}
        data, image = await self.load_image(req, timings)
        result, timings["detect"] = await _timed(
            self._detect(detector, data, categories, req.task, req.max_tokens)
        )
        _service_times(timings, "detect", result.timings_ms)
        visualization = None
        if req.visualize:
            overlay = Overlay()
            for category, shapes in result.predictions.items():
                for shape in shapes:
                    target = overlay.boxes if shape.type == "box" else overlay.points
                    target.append((category, _flat(shape)))
            visualization = await self._overlay(image, overlay, timings)
        _total_service(timings)
        timings["total"] = elapsed_ms(t_start)
        return DetectResponse(
            model=result.model,
            task=req.task,
            image_size=result.image_size,
            categories=list(result.predictions),
            extracted_predictions=result.predictions,
            raw_output=result.raw_output,
            finish_reason=result.finish_reason,
            num_output_tokens=result.num_output_tokens,
            num_prompt_tokens=result.num_prompt_tokens,
            inference_time=result.inference_time,
            generation_time=result.generation_time,
            timings_ms=timings,
            visualization=visualization,
        )

    def _check_detection(self, categories: list[str], max_tokens: int | None) -> list[str]:
        """What the detector would refuse, refused before the image is fetched or decoded."""
        detector_cfg = self.ctx.config(DETECTOR)
        assert detector_cfg is not None
        self.args.limits.check_max_tokens(max_tokens)
        return validate_categories(categories, detector_cfg.max_categories)

    async def _detect(
        self,
        detector: DetectorClient,
        data: bytes,
        categories: list[str],
        task: Any,
        max_tokens: int | None,
    ) -> DetectResult:
        call = DetectCall(image=data, categories=categories, task=task, max_tokens=max_tokens)
        return await detector.detect(call)

    # -------------------------------------------------------------- segment
    async def segment(self, req: SegmentRequest) -> SegmentResponse:
        from .visualize import Overlay

        t_start = time.perf_counter()
        sam = self.ctx.require(SAM, "/v1/segment")
        max_boxes = self._max_boxes()
        if req.boxes is not None:
            check_box_count(len(req.boxes), max_boxes)  # before the image is fetched
        categories: list[str] = []
        if req.categories is not None:
            self.ctx.require(DETECTOR, "/v1/segment with categories")
            categories = self._check_detection(req.categories, req.max_tokens)
        timings: dict[str, float] = {}
        data, image = await self.load_image(req, timings)
        notes: list[str] = []
        predictions: dict[str, list[Shape]] | None = None
        labelled: list[tuple[str | None, list[float]]]
        encode: asyncio.Task[tuple[EncodeResult, float]] | None = None
        try:
            if req.boxes is not None:
                labelled = [(None, list(b)) for b in req.boxes]
            else:
                assert req.categories is not None
                detector = self.ctx.require(DETECTOR, "/v1/segment with categories")
                # SAM's image encoder runs while the detector works.
                encode = asyncio.ensure_future(_encode(sam, data))
                result, timings["detect"] = await _timed(
                    self._detect(detector, data, categories, "detection", req.max_tokens)
                )
                _service_times(timings, "detect", result.timings_ms)
                predictions = result.predictions
                labelled = [
                    (category, _flat(shape))
                    for category, shapes in result.predictions.items()
                    for shape in shapes
                    if shape.type == "box"
                ]
                if len(labelled) > max_boxes:
                    notes.append(f"only the first {max_boxes} of {len(labelled)} boxes segmented")
                    labelled = labelled[:max_boxes]
            masks, seg = await self._masks(sam, data, [b for _, b in labelled], encode, timings)
        finally:
            if encode is not None and not encode.done():
                encode.cancel()
        results = [
            SAMResult(category=category, **mask.model_dump())
            for (category, _), mask in zip(labelled, masks, strict=True)
        ]
        visualization = None
        if req.visualize:
            overlay = Overlay(
                boxes=[(r.category or f"box {i}", r.box) for i, r in enumerate(results)],
                polygons=[(r.category or f"box {i}", r.polygons) for i, r in enumerate(results)],
            )
            visualization = await self._overlay(image, overlay, timings)
        _total_service(timings)
        timings["total"] = elapsed_ms(t_start)
        return SegmentResponse(
            image_size=image.size,
            sam_results=results,
            predictions=predictions,
            message="; ".join(notes)
            or (None if results else "no boxes to segment (nothing was detected)"),
            embedding_cache_hit=None if seg is None else seg.cache_hit,
            timings_ms=timings,
            visualization=visualization,
        )

    async def _masks(
        self,
        sam: SegmenterClient,
        data: bytes,
        boxes: list[list[float]],
        encode: asyncio.Task[tuple[EncodeResult, float]] | None,
        timings: dict[str, float],
    ) -> tuple[list[Mask], SegmentResult | None]:
        """SAM masks for ``boxes``, and the timings of SAM's stages."""
        if not boxes:
            return [], None  # nothing to segment: the head-start encoding is abandoned
        seg: SegmentResult
        seg, timings["segment"] = await _timed(sam.segment(data, boxes))
        _service_times(timings, "segment", seg.timings_ms)
        encode_ms = seg.timings_ms.get("encode", 0.0)
        if encode is not None:
            if encode.done() and not encode.cancelled() and encode.exception() is None:
                encoded, _ = encode.result()
                encode_ms = max(encode_ms, encoded.timings_ms.get("encode", 0.0))
                _service_times(timings, "encode", encoded.timings_ms)
            else:
                # The masks are here, so the head start is of no more use: waiting for it
                # would wait for a whole encoder pass when it went to another replica. A
                # failed head start (e.g. its replica went away) changes nothing either.
                encode.cancel()
        timings["encode"] = encode_ms
        timings["decode_masks"] = seg.timings_ms.get("decode_masks", 0.0)
        timings["polygons"] = seg.timings_ms.get("polygons", 0.0)
        return seg.masks, seg

    # --------------------------------------------------------------- ground
    async def ground(self, req: GroundRequest) -> GroundResponse:
        from .visualize import Overlay

        t_start = time.perf_counter()
        grounder = self.ctx.require(GROUNDER, "/v1/ground")
        detector = self.ctx.require(DETECTOR, "/v1/ground")
        sam = self.ctx.require(SAM, "/v1/ground")
        self.args.limits.check_max_tokens(req.max_tokens)
        grounder_cfg, detector_cfg = self.ctx.config(GROUNDER), self.ctx.config(DETECTOR)
        assert grounder_cfg is not None and detector_cfg is not None
        # Before the image is fetched or decoded and SAM starts encoding it.
        check_caption(req.caption, grounder_cfg.max_caption_chars)
        timings: dict[str, float] = {}
        data, image = await self.load_image(req, timings)
        notes: list[str] = []
        encode = asyncio.ensure_future(_encode(sam, data))
        try:
            found: list[PhraseResult]
            found, timings["phrases"] = await _timed(grounder.phrases(req.caption))
            # Phrases the detector format cannot carry (a "<" or ","), and any beyond the
            # detector's category limit, are left out of detection (and reported empty).
            usable = [p for p in found if check_category(p.text) is None]
            usable = usable[: detector_cfg.max_categories]  # validate_categories would pass
            by_phrase: dict[str, list[list[float]]] = {p.text: [] for p in found}
            seg: SegmentResult | None = None
            masks: list[Mask] = []
            if usable:
                result, timings["detect"] = await _timed(
                    self._detect(
                        detector, data, [p.text for p in usable], "detection", req.max_tokens
                    )
                )
                _service_times(timings, "detect", result.timings_ms)
                notes += _boxes_by_phrase(result, by_phrase, self._max_boxes())
                boxes = [box for p in found for box in by_phrase[p.text]]
                masks, seg = await self._masks(sam, data, boxes, encode, timings)
        finally:
            if not encode.done():
                encode.cancel()
        annotations = _annotations(found, by_phrase, masks)
        visualization = None
        if req.visualize:
            overlay = Overlay()
            for a in annotations:
                overlay.boxes.extend((a.phrase, b) for b in a.boxes)
                overlay.polygons.extend((a.phrase, m.polygons) for m in a.masks)
            visualization = await self._overlay(image, overlay, timings)
        _total_service(timings, timings.get("phrases", 0.0))
        timings["total"] = elapsed_ms(t_start)
        if not found:
            notes.append("the caption has no noun phrases")
        elif not any(a.boxes for a in annotations):
            notes.append("no phrase was detected in the image")
        return GroundResponse(
            image_size=image.size,
            caption=req.caption,
            phrases=[p.text for p in found],
            annotations=annotations,
            message="; ".join(notes) or None,
            embedding_cache_hit=None if seg is None else seg.cache_hit,
            timings_ms=timings,
            visualization=visualization,
        )


def _boxes_by_phrase(
    result: DetectResult, by_phrase: dict[str, list[list[float]]], max_boxes: int
) -> list[str]:
    """Each phrase's detected boxes into ``by_phrase``, the first ``max_boxes`` of all of
    them in phrase order; a note when some were left out."""
    budget = max_boxes
    for phrase, shapes in result.predictions.items():
        boxes = [_flat(s) for s in shapes if s.type == "box"]
        by_phrase[phrase] = boxes[: max(0, budget)]
        budget -= len(boxes)
    if budget < 0:
        return [f"only the first {max_boxes} of {max_boxes - budget} boxes segmented"]
    return []


def _annotations(
    found: list[PhraseResult], by_phrase: dict[str, list[list[float]]], masks: list[Mask]
) -> list[GroundAnnotation]:
    """One annotation per phrase: its boxes and their masks (``masks`` in phrase order)."""
    annotations: list[GroundAnnotation] = []
    cursor = 0
    for p in found:
        n = len(by_phrase[p.text])
        annotations.append(
            GroundAnnotation(
                phrase=p.text,
                start_char=p.start_char,
                end_char=p.end_char,
                boxes=by_phrase[p.text],
                masks=masks[cursor : cursor + n],
            )
        )
        cursor += n
    return annotations


async def resolve_chat_images(req: ChatCompletionRequest, limits: ImageLimits) -> None:
    """Fetch and check every image of a chat request, in place: afterwards each image part
    is a ``data:`` URL within the limits, which is all a model server accepts.

    The counts are checked before anything is fetched: at most ``max_images_per_message``
    per message and ``max_images_per_request`` in all (400 ``too_many_images``). Then the
    images are fetched and decoded concurrently (``max_concurrent_fetches`` at a time),
    all within one deadline (``images_timeout_s``; 400 ``image_url_fetch_failed``) and one
    byte budget for the request (``max_image_bytes_per_request``; 413
    ``images_too_large``), on top of each image's own limits. The first failure cancels
    the other fetches.
    """
    import base64

    from ..images import ByteBudget, decode_image, resolve_image

    parts: list[ContentPart] = []
    for i, message in enumerate(req.messages):
        if not message.has_images():
            continue
        assert isinstance(message.content, list)
        mine = [p for p in message.content if p.type == "image_url"]
        if len(mine) > limits.max_images_per_message:
            raise ImageError(
                f"message {i} has {len(mine)} images, over the limit of "
                f"{limits.max_images_per_message}",
                param=f"messages.{i}.content",
                code="too_many_images",
            )
        for part in mine:
            if part.image_url is None:
                raise ImageError("an image_url part needs image_url.url", param=f"messages.{i}")
        parts.extend(mine)
    if len(parts) > limits.max_images_per_request:
        raise ImageError(
            f"the request has {len(parts)} images, over the limit of "
            f"{limits.max_images_per_request}",
            param="messages",
            code="too_many_images",
        )
    budget = ByteBudget(limits.max_image_bytes_per_request)
    gate = asyncio.Semaphore(limits.max_concurrent_fetches)

    async def resolve(part: ContentPart) -> None:
        assert part.image_url is not None
        url = part.image_url.url
        async with gate:
            data = await resolve_image(None, url, limits, budget)
            await asyncio.to_thread(decode_image, data, limits.max_image_pixels, "image_url")
        if not url.startswith("data:"):
            part.image_url.url = (
                "data:application/octet-stream;base64," + base64.b64encode(data).decode()
            )

    tasks = [asyncio.ensure_future(resolve(part)) for part in parts]
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=limits.images_timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones; the rest are of no more use
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # the first failure, in the order of the images
        if task in done and (error := task.exception()) is not None:
            raise error
    if pending:
        raise ImageError(
            f"fetching and checking the request's images took over {limits.images_timeout_s} s",
            param="messages",
            code="image_url_fetch_failed",
        )
