"""Segment-anything: boxes -> masks -> polygons, with the image encoder run once per image.

SAM's cost is lopsided: the ViT image encoder is seconds per image on a CPU (ViT-H: a
large fraction of a second on a GPU), the prompt encoder + mask decoder tens of
milliseconds per box. So :class:`Segmenter`:

- computes an image's embedding once and keeps recent ones in a bounded LRU keyed by the
  SHA-256 of the image file, so a repeated image (or the ``encode`` the vision pipeline
  starts while the detector is still running) skips the encoder entirely;
- batches the image encodings of concurrent requests into one encoder call
  (:class:`~.batching.MicroBatcher`), and coalesces concurrent requests for the same
  image into one encoding;
- decodes all boxes of a request in one job: on a GPU in one batched prompt-encoder +
  mask-decoder call (what ``SamPredictor.predict_torch`` does, without the predictor's
  per-image state, so requests on different images can interleave safely); on a CPU one
  box per decoder call inside that job: the decoder repeats the image embedding for
  every box, so batching saves no arithmetic, and on a CPU the big batched call was
  mostly the slower one (up to a third; BENCHMARKS.md); ``decoder_batch_size``
  overrides the choice;
- turns each mask into polygons: outer contours (OpenCV), simplified with
  Douglas-Peucker, in pixel coordinates of the original image, largest first.

All model work runs on one worker thread (the model is not re-entrant and a CPU has no
spare cores to run two at once); the event loop only schedules.

Model types are segment-anything's ``vit_h`` / ``vit_l`` / ``vit_b`` and ``smoke``, a
2-block ViT encoder with the real prompt encoder and decoder, for the embedded default
(see :mod:`.smoke`). Every type loads through segment-anything's ``checkpoint=`` path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..timing import elapsed_ms
from ..vision_checks import check_box_count
from .batching import MicroBatcher

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)


def sam_builders() -> dict[str, Callable[..., Any]]:
    """Model type -> segment-anything builder (``builder(checkpoint=path)``)."""
    try:
        # _build_sam is private: segment-anything is pinned (==1.0, its only release).
        from segment_anything.build_sam import _build_sam, sam_model_registry
    except ImportError as e:
        raise ImportError(
            f"SAM needs segment-anything: pip install 'serve-apps[vision]' ({e})"
        ) from e

    return {
        "vit_h": sam_model_registry["vit_h"],
        "vit_l": sam_model_registry["vit_l"],
        "vit_b": sam_model_registry["vit_b"],
        # segment-anything's own builder with a small encoder: the same Sam class, the same
        # checkpoint loading (torch.load + strict load_state_dict).
        "smoke": partial(
            _build_sam,
            encoder_embed_dim=64,
            encoder_depth=2,
            encoder_num_heads=2,
            encoder_global_attn_indexes=[1],
        ),
    }


@dataclass
class ImageEmbedding:
    """What the mask decoder needs from an image (``SamPredictor``'s per-image state)."""

    features: torch.Tensor  # (1, 256, 64, 64), on the model's device
    original_size: tuple[int, int]  # (height, width) of the image
    input_size: tuple[int, int]  # (height, width) after resizing the long side to 1024


@dataclass
class _Encoding:
    """An image encoding in progress and how many requests wait for it."""

    task: asyncio.Task[tuple[ImageEmbedding, dict[str, float]]]
    waiters: int = 0


@dataclass
class MaskResult:
    box: list[float]  # the prompt box, x1 y1 x2 y2 in pixels
    score: float  # SAM's predicted IoU
    area: int  # mask pixels
    polygons: list[list[int]]  # each [x0, y0, x1, y1, ...], largest first


@dataclass
class SegmentOutput:
    results: list[MaskResult]
    image_size: tuple[int, int]  # (width, height)
    cache_hit: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class EncodeOutput:
    image_size: tuple[int, int]  # (width, height)
    cache_hit: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


def mask_to_polygons(
    mask: np.ndarray, epsilon: float = 0.003, min_area: float = 10.0, max_polygons: int = 16
) -> list[list[int]]:
    """Outer contours of a binary mask as flat ``[x0, y0, x1, y1, ...]`` pixel polygons.

    Vertices are the centres of boundary pixels (OpenCV's convention), so a polygon's area
    is about half a perimeter smaller than the mask's; holes are not represented.
    ``epsilon`` is the Douglas-Peucker tolerance as a fraction of the contour's perimeter
    (0 keeps every vertex of the pixel boundary); contours under ``min_area`` square
    pixels (specks) are dropped, and at most ``max_polygons`` of the largest are kept.
    """
    import cv2
    import numpy as np

    binary = np.ascontiguousarray(mask, dtype=np.uint8)  # OpenCV refuses bool arrays
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    kept: list[tuple[float, list[int]]] = []
    for contour in contours:
        area = float(cv2.contourArea(contour))
        if len(contour) < 3 or area < min_area:
            continue
        if epsilon > 0:
            simplified = cv2.approxPolyDP(contour, epsilon * cv2.arcLength(contour, True), True)
            if len(simplified) >= 3:
                contour = simplified
        kept.append((area, [int(v) for v in contour.reshape(-1)]))
    kept.sort(key=lambda item: -item[0])
    return [polygon for _, polygon in kept[:max_polygons]]


class Segmenter:
    """A SAM model behind ``encode`` / ``segment``; see the module docstring."""

    def __init__(
        self,
        model_type: str,
        checkpoint: str,
        *,
        device: str = "auto",
        cache_size: int = 32,
        max_batch_size: int = 4,
        batch_wait_s: float = 0.002,
        max_boxes: int = 256,
        decoder_batch_size: int | None = None,
        polygon_epsilon: float = 0.003,
        min_polygon_area: float = 10.0,
        max_polygons: int = 16,
        max_image_pixels: int | None = None,
    ):
        self.model_type = model_type
        self.checkpoint = checkpoint
        self._device_cfg = device
        self.cache_size = cache_size
        self.max_boxes = max_boxes
        self._decoder_batch_cfg = decoder_batch_size
        self.decoder_batch_size = 1
        self._polygon = {
            "epsilon": polygon_epsilon,
            "min_area": min_polygon_area,
            "max_polygons": max_polygons,
        }
        self._max_image_pixels = max_image_pixels
        self._cache: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._inflight: dict[str, _Encoding] = {}
        # One thread runs every model call; the batcher queues encodings in front of it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam")
        self._batcher: MicroBatcher[np.ndarray, ImageEmbedding] = MicroBatcher(
            self._encode_batch,
            max_batch_size=max_batch_size,
            max_wait_s=batch_wait_s,
            executor=self._executor,
        )
        self.counters = {"encoded_images": 0, "cache_hits": 0, "cache_misses": 0, "boxes": 0}
        self.model: Any = None

    # ---------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Build the model and load ``checkpoint`` (segment-anything's loading path)."""
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        builders = sam_builders()
        if self.model_type not in builders:
            raise ValueError(
                f"unknown SAM model_type {self.model_type!r}; known: {sorted(builders)}"
            )
        device = self._device_cfg
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        sam = builders[self.model_type](checkpoint=self.checkpoint)
        self.model = sam.to(self.device).eval()
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        if self._decoder_batch_cfg is not None:
            self.decoder_batch_size = self._decoder_batch_cfg
        else:
            self.decoder_batch_size = 1 if self.device.type == "cpu" else 64
        logger.info("loaded SAM %s from %s on %s", self.model_type, self.checkpoint, device)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def shutdown(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "cached_embeddings": len(self._cache),
            "encoder_batch_sizes": dict(self._batcher.batch_sizes),
        }

    # ------------------------------------------------------------------ requests
    async def encode(self, image: bytes) -> EncodeOutput:
        """Make sure ``image``'s embedding is cached (the pipeline's head start)."""
        t0 = time.perf_counter()
        embedding, hit, timings = await self._embedding(image)
        timings["total"] = elapsed_ms(t0)
        h, w = embedding.original_size
        return EncodeOutput(image_size=(w, h), cache_hit=hit, timings_ms=timings)

    async def segment(self, image: bytes, boxes: Sequence[Sequence[float]]) -> SegmentOutput:
        """Masks and polygons for ``boxes`` (x1 y1 x2 y2, pixels) on ``image`` (file bytes)."""
        t0 = time.perf_counter()
        check_box_count(len(boxes), self.max_boxes)
        embedding, hit, timings = await self._embedding(image)
        h, w = embedding.original_size
        results: list[MaskResult] = []
        if boxes:
            clean = [_clip_box(b, w, h) for b in boxes]
            results, decode_timings = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._decode_boxes, embedding, clean
            )
            timings.update(decode_timings)
            self.counters["boxes"] += len(clean)
        timings["total"] = elapsed_ms(t0)
        return SegmentOutput(results=results, image_size=(w, h), cache_hit=hit, timings_ms=timings)

    # ---------------------------------------------------------------- embeddings
    async def _embedding(self, image: bytes) -> tuple[ImageEmbedding, bool, dict[str, float]]:
        from ..images import image_key

        key = image_key(image)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        metrics.inc(metrics.SAM_EMBEDDING_CACHE, result="miss" if cached is None else "hit")
        if cached is not None:
            self.counters["cache_hits"] += 1
            return cached, True, {"decode": 0.0, "encode": 0.0}
        encoding = self._inflight.get(key)
        shared = encoding is not None
        if encoding is None:
            # The encoding is a task of its own, not part of this request: a client that
            # goes away must not fail the other requests waiting for the same image.
            self.counters["cache_misses"] += 1
            task = asyncio.get_running_loop().create_task(self._compute(key, image))
            encoding = _Encoding(task)
            self._inflight[key] = encoding
            task.add_done_callback(partial(self._encoded, key, encoding))
        else:
            self.counters["cache_hits"] += 1
        encoding.waiters += 1
        t0 = time.perf_counter()
        try:
            embedding, timings = await asyncio.shield(encoding.task)
        finally:
            encoding.waiters -= 1
            if encoding.waiters == 0 and not encoding.task.done():
                # Every request that wanted it has gone (cancelled): stop the encoding. If
                # it is still queued for the encoder it never runs; an encoder call that
                # has started cannot be stopped, and its result is dropped. A request for
                # the same image that comes now starts a new encoding.
                encoding.task.cancel()
                if self._inflight.get(key) is encoding:
                    del self._inflight[key]
        if shared:  # this request only waited for another one's encoding
            timings = {"decode": 0.0, "encode": elapsed_ms(t0)}
        return embedding, shared, timings

    async def _compute(self, key: str, image: bytes) -> tuple[ImageEmbedding, dict[str, float]]:
        t0 = time.perf_counter()
        pixels = await asyncio.to_thread(self._pixels, image)
        decoded = elapsed_ms(t0)
        t0 = time.perf_counter()
        embedding = await self._batcher.submit(pixels)
        with self._cache_lock:
            self._cache[key] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding, {"decode": decoded, "encode": elapsed_ms(t0)}

    def _encoded(self, key: str, encoding: _Encoding, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is encoding:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark it retrieved: every waiter may have gone

    def _pixels(self, image: bytes) -> np.ndarray:
        import numpy as np

        from ..errors import ImageError
        from ..images import decode_image

        pixels = np.asarray(decode_image(image, self._max_image_pixels))
        height, width = pixels.shape[:2]
        size = self.model.image_encoder.img_size
        if 0 in self.transform.get_preprocess_shape(height, width, size):
            # Resized to 1024 on the long side, the short side would vanish.
            raise ImageError(f"a {width}x{height} image is too thin to segment")
        return pixels

    def _encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """One image-encoder call for several images (``SamPredictor.set_image``, batched)."""
        import torch

        inputs, sizes = [], []
        for pixels in images:
            resized = self.transform.apply_image(pixels)
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            sizes.append(((pixels.shape[0], pixels.shape[1]), (tensor.shape[1], tensor.shape[2])))
            inputs.append(self.model.preprocess(tensor[None]))  # normalise, pad to 1024x1024
        with torch.inference_mode():
            features = self.model.image_encoder(torch.cat(inputs))
        self.counters["encoded_images"] += len(images)
        return [
            ImageEmbedding(features[i : i + 1].clone(), original, resized)
            for i, (original, resized) in enumerate(sizes)
        ]

    # ------------------------------------------------------------------- masks
    def _decode_boxes(
        self, embedding: ImageEmbedding, boxes: list[list[float]]
    ) -> tuple[list[MaskResult], dict[str, float]]:
        """All boxes through the prompt encoder and mask decoder at once, then polygons."""
        import torch

        sam = self.model
        t0 = time.perf_counter()
        low_res, scores = [], []
        with torch.inference_mode():
            dense_pe = sam.prompt_encoder.get_dense_pe()
            # On a GPU the boxes of a request go through in one call (chunks only bound
            # memory for very many boxes); on a CPU, one at a time is faster (see __init__).
            step = self.decoder_batch_size
            for start in range(0, len(boxes), step):
                chunk = torch.as_tensor(
                    boxes[start : start + step],
                    dtype=torch.float,
                    device=self.device,
                )
                prompt = self.transform.apply_boxes_torch(chunk, embedding.original_size)
                sparse, dense = sam.prompt_encoder(points=None, boxes=prompt, masks=None)
                logits, iou = sam.mask_decoder(
                    image_embeddings=embedding.features,
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                low_res.append(logits)
                scores.append(iou[:, 0])
            low_res_all = torch.cat(low_res)
            score_list = torch.cat(scores).tolist()
        decoded = elapsed_ms(t0)
        t0 = time.perf_counter()
        results: list[MaskResult] = []
        with torch.inference_mode():
            # Full-resolution masks are height x width per box: upsample a few at a time.
            for start in range(0, len(boxes), 8):
                masks = sam.postprocess_masks(
                    low_res_all[start : start + 8], embedding.input_size, embedding.original_size
                )
                binary = (masks[:, 0] > sam.mask_threshold).cpu().numpy()
                for j, mask in enumerate(binary):
                    i = start + j
                    results.append(
                        MaskResult(
                            box=boxes[i],
                            score=float(score_list[i]),
                            area=int(mask.sum()),
                            polygons=mask_to_polygons(mask, **self._polygon),  # type: ignore[arg-type]
                        )
                    )
        return results, {"decode_masks": decoded, "polygons": elapsed_ms(t0)}


def _clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """A box inside the image with x1 <= x2 and y1 <= y2 (clients send either order)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    return [x1, y1, x2, y2]
