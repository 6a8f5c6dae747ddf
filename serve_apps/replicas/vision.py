"""The vision services, one per deployment: the detector, SAM and the grounder.

- :class:`DetectorServer` is an :class:`~.llm.LLMServer` on a vision-language model (chat
  and completions, with images) plus ``detect``: Rex-Omni's prompt, generation constrained
  by the grammar of Rex-Omni's answer for the asked categories, and the parsed result;
- :class:`SegmenterServer` wraps the SAM engine (``encode`` / ``segment``);
- :class:`GrounderServer` wraps the spaCy engine (``phrases``).

Each takes and returns the models of :mod:`serve_apps.schemas.vision`, so a handle of
any target can carry them. ``start()`` is awaited once before use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from ..config import DetectorConfig, GrounderConfig, SAMConfig, Settings
from ..engines.base import Constraint, GenerationRequest, LLMEngine, SamplingParams
from ..errors import UnsupportedError
from ..schemas.vision import (
    DetectCall,
    DetectResult,
    EncodeResult,
    Mask,
    PhraseResult,
    SegmentResult,
    Shape,
)
from ..service_time import ServiceClock
from ..timing import elapsed_ms
from ..vision_checks import check_caption, validate_categories
from .llm import LLMServer

logger = logging.getLogger(__name__)


class DetectorServer(LLMServer):
    """The detector deployment: an LLM server whose model sees images, plus ``detect``."""

    config_type: ClassVar[type[DetectorConfig]] = DetectorConfig
    config: DetectorConfig
    service: str = "Detector"

    def __init__(
        self,
        config: DetectorConfig,
        *,
        engine: LLMEngine | None = None,
        settings: Settings | None = None,
        placement_group: Any = None,
    ):
        # placement_group: a vLLM detector's tensor-parallel workers (as LLMServer's).
        super().__init__(config, engine=engine, settings=settings, placement_group=placement_group)

    async def detect(self, call: DetectCall) -> DetectResult:
        from ..engines import detection
        from ..images import decode_image

        t_start = time.perf_counter()
        clock = ServiceClock(self.service)
        cfg = self.config
        info = self._engine.info()
        if not info.supports_images:
            raise UnsupportedError(f"model {cfg.served_model_name} does not take images")
        categories = validate_categories(call.categories, cfg.max_categories)
        max_tokens = call.max_tokens or cfg.detect_max_tokens
        image = await asyncio.to_thread(decode_image, call.image)
        timings = {"decode": elapsed_ms(t_start)}
        width, height = image.size
        prompt = self._engine.apply_chat_template(
            [
                {"role": "system", "content": cfg.system_prompt},
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": detection.build_prompt(call.task, categories)},
                    ],
                },
            ]
        )
        grammar = detection.detection_grammar(
            categories, call.task, info.special_tokens, cfg.max_shapes_per_category
        )
        request = GenerationRequest(
            prompt=prompt,
            sampling=SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0,
                repetition_penalty=cfg.repetition_penalty,
                skip_special_tokens=False,
            ),
            constraint=Constraint("grammar", grammar),
            images=[image],
            add_special_tokens=False,
        )
        t0 = time.perf_counter()
        (out,) = await self._generate_all(clock, [request])
        generation_s = time.perf_counter() - t0
        timings["generate"] = round(generation_s * 1000, 3)
        parsed = detection.parse_prediction(out.text, width, height)
        predictions = detection.predictions_for_task(parsed, call.task, categories)
        assert out.finish_reason is not None
        timings.update(clock.finish())
        return DetectResult(
            model=cfg.served_model_name,
            image_size=(width, height),
            predictions={
                c: [Shape.model_validate(s) for s in shapes] for c, shapes in predictions.items()
            },
            raw_output=out.text,
            finish_reason=out.finish_reason,
            num_output_tokens=out.completion_tokens,
            num_prompt_tokens=out.prompt_tokens,
            inference_time=round(time.perf_counter() - t_start, 6),
            generation_time=round(generation_s, 6),
            timings_ms=timings,
        )


class SegmenterServer:
    """The SAM deployment."""

    config_type: ClassVar[type[SAMConfig]] = SAMConfig
    service: str = "SAM"

    def __init__(self, config: SAMConfig, *, settings: Settings | None = None):
        self.config = config
        self._settings = settings or Settings()
        self.segmenter: Any = None

    async def start(self) -> None:
        from ..engines.segmenter import Segmenter

        checkpoint = self.config.checkpoint
        if checkpoint is not None and self._settings.offline_models:
            from ..provision import Checkpoint, model_assets
            from ..provision import checkpoint as provisioned

            for asset in model_assets(self.config):  # an official checkpoint: prefetched
                if isinstance(asset, Checkpoint):
                    checkpoint = str(provisioned(asset, self._settings))
        if checkpoint is None:
            from ..engines.smoke import smoke_sam_checkpoint

            checkpoint = str(
                await asyncio.to_thread(smoke_sam_checkpoint, self._settings.cache_dir)
            )
        cfg = self.config
        self.segmenter = Segmenter(
            cfg.model_type,
            checkpoint,
            device=cfg.device,
            cache_size=cfg.embedding_cache_size,
            max_batch_size=cfg.max_batch_size,
            batch_wait_s=cfg.batch_wait_ms / 1000,
            max_boxes=cfg.max_boxes,
            decoder_batch_size=cfg.decoder_batch_size,
            polygon_epsilon=cfg.polygon_epsilon,
            min_polygon_area=cfg.min_polygon_area,
            max_polygons=cfg.max_polygons_per_mask,
        )
        await self.segmenter.start()
        logger.info("SAM %s ready", cfg.model_type)

    async def health(self) -> dict[str, object]:
        if self.segmenter is None or self.segmenter.model is None:
            raise RuntimeError("SegmenterServer.start() was not awaited")
        return {"model_type": self.config.model_type, "smoke": self.config.is_smoke}

    async def encode(self, image: bytes) -> EncodeResult:
        clock = ServiceClock(self.service)
        out = await self.segmenter.encode(image)
        return EncodeResult(
            image_size=out.image_size,
            cache_hit=out.cache_hit,
            timings_ms={**out.timings_ms, **clock.finish()},
        )

    async def segment(self, image: bytes, boxes: list[list[float]]) -> SegmentResult:
        clock = ServiceClock(self.service)
        out = await self.segmenter.segment(image, boxes)
        return SegmentResult(
            image_size=out.image_size,
            masks=[
                Mask(box=r.box, score=r.score, area=r.area, polygons=r.polygons)
                for r in out.results
            ],
            cache_hit=out.cache_hit,
            timings_ms={**out.timings_ms, **clock.finish()},
        )

    async def stats(self) -> dict[str, Any]:
        return dict(self.segmenter.stats())

    async def shutdown(self) -> None:
        if self.segmenter is not None:
            await self.segmenter.shutdown()


class GrounderServer:
    """The grounder deployment."""

    config_type: ClassVar[type[GrounderConfig]] = GrounderConfig
    service: str = "Grounder"

    def __init__(self, config: GrounderConfig, *, settings: Settings | None = None):
        # settings: the servers' common signature; the grounder keeps no model cache.
        self.config = config
        self.grounder: Any = None

    async def start(self) -> None:
        from ..engines.grounder import Grounder

        self.grounder = Grounder(self.config.pipeline, lowercase=self.config.lowercase)
        await self.grounder.start()

    async def health(self) -> dict[str, object]:
        if self.grounder is None:
            raise RuntimeError("GrounderServer.start() was not awaited")
        return {"pipeline": self.config.pipeline}

    async def phrases(self, caption: str) -> list[PhraseResult]:
        clock = ServiceClock(self.service)
        check_caption(caption, self.config.max_caption_chars)  # the ingress checked it too
        found = await self.grounder.phrases_async(caption)
        clock.finish()
        return [
            PhraseResult(text=p.text, start_char=p.start_char, end_char=p.end_char, root=p.root)
            for p in found[: self.config.max_phrases]
        ]

    async def shutdown(self) -> None:
        return None
