"""The vision APIs: ``POST /v1/detect``, ``/v1/segment``, ``/v1/ground``, and the calls
between the ingress and the vision services.

Requests are our own API, so unknown fields are errors (as in ``/v1/generate``). Every
request carries one image, as ``image`` (base64 or a ``data:`` URL) or ``image_url``
(http/https, or a data URL), and may ask for ``visualize: true`` (a PNG overlay of the
result in ``visualization``, as a data URL). Coordinates are pixels of the image as sent
(after its EXIF rotation), x1 y1 x2 y2 for boxes. Every response has ``timings_ms``, a
per-stage breakdown; stages that run concurrently overlap, so they need not add up to
``total``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .common import FinishReason, StrictModel

Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Box = Annotated[list[Coordinate], Field(min_length=4, max_length=4)]
Task = Literal["detection", "pointing"]


class ImageRequest(StrictModel):
    image: str | None = Field(default=None, description="base64, or a data URL")
    image_url: str | None = Field(default=None, description="http(s) URL, or a data URL")
    visualize: bool = Field(default=False, description="add a PNG overlay of the result")

    @model_validator(mode="after")
    def _one_image(self) -> ImageRequest:
        if (self.image is None) == (self.image_url is None):
            raise ValueError("give exactly one of image (base64 or data URL) and image_url")
        return self


def _category_list(value: Any) -> Any:
    # The old service took "a, b" as well as ["a", "b"].
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class DetectRequest(ImageRequest):
    categories: list[str] = Field(min_length=1, description='["person", "car"] or "person, car"')
    task: Task = "detection"
    max_tokens: int | None = Field(default=None, ge=1, description="default: the detector's")

    split_categories = field_validator("categories", mode="before")(_category_list)


class SegmentRequest(ImageRequest):
    """Either explicit ``boxes`` or ``categories`` (detected first, then segmented)."""

    boxes: list[Box] | None = None
    categories: list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="for the detection step")

    split_categories = field_validator("categories", mode="before")(_category_list)

    @model_validator(mode="after")
    def _boxes_or_categories(self) -> SegmentRequest:
        if (self.boxes is None) == (self.categories is None):
            raise ValueError("give exactly one of boxes and categories")
        if self.categories is not None and not self.categories:
            raise ValueError("categories is empty")
        return self


class GroundRequest(ImageRequest):
    caption: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="for the detection step")


# ------------------------------------------------------------------ responses
class Shape(BaseModel):
    type: Literal["box", "point", "polygon"]
    coords: list[float] | list[list[float]]


class DetectResponse(BaseModel):
    model: str
    task: Task
    image_size: tuple[int, int] = Field(description="width, height")
    categories: list[str]
    # Rex-Omni's result fields: predictions per category, seconds, token counts.
    extracted_predictions: dict[str, list[Shape]]
    raw_output: str
    finish_reason: FinishReason
    num_output_tokens: int
    num_prompt_tokens: int
    inference_time: float = Field(description="seconds in the detector, image decoding included")
    generation_time: float = Field(description="seconds of generation")
    timings_ms: dict[str, float]
    visualization: str | None = None


class Mask(BaseModel):
    box: list[float] = Field(description="the prompt box, x1 y1 x2 y2")
    score: float = Field(description="SAM's predicted IoU of the mask")
    area: int = Field(description="mask pixels")
    polygons: list[list[int]] = Field(description="outer contours, [x0, y0, x1, y1, ...]")


class SAMResult(Mask):
    category: str | None = Field(description="the detected category; null for given boxes")


class SegmentResponse(BaseModel):
    image_size: tuple[int, int]
    sam_results: list[SAMResult]
    predictions: dict[str, list[Shape]] | None = Field(
        default=None, description="the detections, when categories were given"
    )
    message: str | None = None
    embedding_cache_hit: bool | None = Field(
        default=None, description="the image embedding came from SAM's cache"
    )
    timings_ms: dict[str, float]
    visualization: str | None = None


class GroundAnnotation(BaseModel):
    phrase: str
    start_char: int
    end_char: int
    boxes: list[list[float]]
    masks: list[Mask]


class GroundResponse(BaseModel):
    image_size: tuple[int, int]
    caption: str
    phrases: list[str]
    annotations: list[GroundAnnotation]
    message: str | None = None
    embedding_cache_hit: bool | None = None
    timings_ms: dict[str, float]
    visualization: str | None = None


# ------------------------------------------- between the ingress and the services
class DetectCall(BaseModel):
    """``Detector.detect``: the validated image file and what to look for."""

    image: bytes
    categories: list[str]
    task: Task = "detection"
    max_tokens: int | None = None


class DetectResult(BaseModel):
    model: str
    image_size: tuple[int, int]
    predictions: dict[str, list[Shape]]
    raw_output: str
    finish_reason: FinishReason
    num_output_tokens: int
    num_prompt_tokens: int
    inference_time: float
    generation_time: float
    timings_ms: dict[str, float]


class EncodeResult(BaseModel):
    """``SAM.encode``: the image's embedding is now cached in that replica."""

    image_size: tuple[int, int]
    cache_hit: bool
    timings_ms: dict[str, float]


class SegmentResult(BaseModel):
    """``SAM.segment``: one mask per box, in the order of the boxes."""

    image_size: tuple[int, int]
    masks: list[Mask]
    cache_hit: bool
    timings_ms: dict[str, float]


class PhraseResult(BaseModel):
    """``Grounder.phrases``: one noun phrase of the caption."""

    text: str
    start_char: int
    end_char: int
    root: str
