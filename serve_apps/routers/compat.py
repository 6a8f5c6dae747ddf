"""The seed services' own HTTP contracts, mapped onto this app's pipelines.

This is the one compatibility module: the five services this project replaces had their
own paths and fields, and their clients keep working against these routes unchanged.
Each route is a field mapping over logic that lives elsewhere (the vision pipelines, the
OpenAI chat route, ``/v1/generate``); none is reimplemented here.

========================== ======================================= ========================
route                      request -> response                     served by
========================== ======================================= ========================
``/rex_inference``         ``{image, task, categories}`` ->        ``/v1/detect``
                           ``{success, task, extracted_predictions,
                           inference_time, num_output_tokens,
                           generation_time, ...}``
``/api_sam``               ``{image, categories}`` -> ``{success,  ``/v1/segment``
                           predictions, sam_results}``
``/api_grounding``         ``{image, caption}`` -> ``{success, ...}`` ``/v1/ground``
``/generate_api``          Ananke's ``{prompt, constraints, ...}``  ``/v1/generate``
``/generate_description``  ``{frame_base64 | image_url, prompt}``   chat with an image, on
                           -> ``{description}``                    ``compat.vl_model``
``/upload_and_process_     a zip of frames (request body, or        the same, per frame
frames``                   multipart field ``file``) -> ``{success,
                           descriptions: [{frame, description}]}``
``/extract_from_url``,     ``{image_url}`` or ``{image}`` ->        the same, asking for
``/extract_text``          ``{success, content, content_length,     markdown
                           word_count}``
========================== ======================================= ========================

Ananke's ``GET /health`` is the app's own ``/health`` (200 ``{"status": "ok"}`` when
ready). Errors keep their status and the shared envelope, plus ``"success": false``. A
route is mounted when its services are configured and ``compat.routes`` does not switch
it off (an unmounted route is a 404).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, model_validator

from ..errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    ServeAppError,
    UnsupportedError,
    error_body,
    error_headers,
    status_of,
    unwrap,
    validation_error,
)
from ..pipelines.vision import VisionPipelines
from ..registry import DETECTOR, GROUNDER, SAM, AppContext
from ..schemas.common import StrictModel, TolerantModel
from ..schemas.generate import GenerateRequest
from ..schemas.openai import ChatCompletionRequest, ChatCompletionResponse
from ..schemas.vision import DetectRequest, GroundRequest, SegmentRequest
from .generate import generate
from .openai import chat_completions

M = TypeVar("M", bound=BaseModel)
logger = logging.getLogger(__name__)

DEFAULT_DESCRIBE_PROMPT = "Describe this video frame in detail."
EXTRACT_PROMPT = (
    "Extract all the text of this document image as Markdown, keeping its headings, "
    "lists and tables. Answer with the Markdown only."
)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class DescribeRequest(TolerantModel):
    """Cogniverse's ``generate_description`` (its other fields, e.g. paths on its own
    volume, are tolerated and unused: a frame comes as base64 or by URL here)."""

    frame_base64: str | None = None
    image_url: str | None = None
    prompt: str = Field(default=DEFAULT_DESCRIBE_PROMPT, min_length=1)

    @model_validator(mode="after")
    def _one_frame(self) -> DescribeRequest:
        if (self.frame_base64 is None) == (self.image_url is None):
            raise ValueError("give exactly one of frame_base64 and image_url")
        return self


class ExtractRequest(StrictModel):
    """OmniDocs' text extraction: a document image, inline or by URL."""

    image: str | None = None
    image_url: str | None = None

    @model_validator(mode="after")
    def _one_image(self) -> ExtractRequest:
        if (self.image is None) == (self.image_url is None):
            raise ValueError("give exactly one of image (base64 or data URL) and image_url")
        return self


def _failure(e: BaseException) -> JSONResponse:
    err = unwrap(e)
    return JSONResponse(
        {"success": False, **error_body(err)},
        status_code=status_of(err),
        headers=error_headers(err),
    )


async def _body(request: Request, model: type[M]) -> M:
    try:
        data = await request.json()
    except ValueError as e:
        raise InvalidRequestError(
            f"request body is not valid JSON: {e}", code="invalid_json"
        ) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from e


def _data_url(value: str) -> str:
    """A frame as a chat image URL: URLs and data URLs as they are, bare base64 wrapped."""
    if value.startswith(("data:", "http://", "https://")):
        return value
    return "data:application/octet-stream;base64," + value


class Compat:
    """The routes' logic, over one app's context."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.config = ctx.args.compat
        self.pipelines = VisionPipelines(ctx)

    def vl_model(self) -> str | None:
        """The image-text model that describes and extracts (config, else the first)."""
        if self.config.vl_model is not None:
            return self.config.vl_model
        for cfg in self.ctx.args.model_configs().values():
            if cfg.modality == "image-text":
                return cfg.served_model_name
        return None

    async def ask_vl(self, image_url: str, prompt: str) -> str:
        model = self.vl_model()
        if model is None:
            raise UnsupportedError("no image-text model is configured (compat.vl_model)")
        req = ChatCompletionRequest.model_validate(
            {
                "model": model,
                "max_tokens": self.config.max_tokens,
                "temperature": 0.0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_url}},
                            {"type": "text", "text": prompt},
                        ],
                    }
                ],
            }
        )
        out = await chat_completions(self.ctx, req)
        assert isinstance(out, ChatCompletionResponse)
        return out.choices[0].message.content or ""

    # ------------------------------------------------------------------ routes
    async def rex_inference(self, request: Request) -> dict[str, Any]:
        req = await _body(request, DetectRequest)
        return {"success": True, **(await self.pipelines.detect(req)).model_dump()}

    async def api_sam(self, request: Request) -> dict[str, Any]:
        req = await _body(request, SegmentRequest)
        return {"success": True, **(await self.pipelines.segment(req)).model_dump()}

    async def api_grounding(self, request: Request) -> dict[str, Any]:
        req = await _body(request, GroundRequest)
        return {"success": True, **(await self.pipelines.ground(req)).model_dump()}

    async def generate_api(self, request: Request) -> dict[str, Any]:
        req = await _body(request, GenerateRequest)
        if req.model is None and self.config.generate_model is not None:
            req = req.model_copy(update={"model": self.config.generate_model})
        return (await generate(self.ctx, req)).model_dump()

    async def generate_description(self, request: Request) -> dict[str, Any]:
        req = await _body(request, DescribeRequest)
        frame = req.frame_base64 if req.frame_base64 is not None else req.image_url
        assert frame is not None
        return {"description": await self.ask_vl(_data_url(frame), req.prompt)}

    async def upload_and_process_frames(self, request: Request) -> dict[str, Any]:
        import base64

        data, prompt = await self._zip_upload(request)
        frames = read_frames(
            data,
            max_frames=self.config.max_zip_frames,
            max_frame_bytes=self.config.max_frame_bytes,
            max_ratio=self.config.max_zip_ratio,
        )
        descriptions = []
        for name, frame in frames:  # one at a time: the VL model batches its own requests
            url = "data:application/octet-stream;base64," + base64.b64encode(frame).decode()
            descriptions.append({"frame": name, "description": await self.ask_vl(url, prompt)})
        return {"success": True, "num_frames": len(descriptions), "descriptions": descriptions}

    async def _zip_upload(self, request: Request) -> tuple[bytes, str]:
        """The zip (the body, or the multipart field ``file``) and the prompt (the query
        or form field ``prompt``)."""
        limit = self.config.max_zip_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"the upload is over {limit} bytes", param="file")
        prompt = request.query_params.get("prompt") or DEFAULT_DESCRIBE_PROMPT
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as e:  # no boundary, a broken part: the body is the client's
                raise InvalidRequestError(
                    f"the multipart body cannot be read: {e or type(e).__name__}", param="file"
                ) from e
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidRequestError(
                    "send the zip as the multipart field 'file'", param="file"
                )
            field = form.get("prompt")
            if isinstance(field, str) and field:
                prompt = field
            data = await upload.read(limit + 1)
        else:
            data = await request.body()
        if len(data) > limit:
            raise PayloadTooLargeError(f"the upload is over {limit} bytes", param="file")
        return data, prompt

    async def extract(self, request: Request) -> dict[str, Any]:
        req = await _body(request, ExtractRequest)
        image = req.image if req.image is not None else req.image_url
        assert image is not None
        content = await self.ask_vl(_data_url(image), EXTRACT_PROMPT)
        return {
            "success": True,
            "content": content,
            "content_length": len(content),
            "word_count": len(content.split()),
        }


def read_frames(
    data: bytes, *, max_frames: int, max_frame_bytes: int, max_ratio: int
) -> list[tuple[str, bytes]]:
    """The image files of a zip, in name order, within bounds decided before inflating:
    at most ``max_frames`` images, each at most ``max_frame_bytes`` uncompressed and at
    most ``max_ratio`` times its compressed size (a zip bomb is refused, not inflated).
    Directories and non-image files are skipped; a file inflating past what its header
    says is refused too."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InvalidRequestError(f"the upload is not a zip file: {e}", param="file") from e
    with archive:
        infos = sorted(
            (
                i
                for i in archive.infolist()
                if not i.is_dir()
                and i.filename.lower().endswith(FRAME_SUFFIXES)
                and not i.filename.startswith(("__MACOSX/", "."))
            ),
            key=lambda i: i.filename,
        )
        if not infos:
            raise InvalidRequestError("the zip holds no image frames", param="file")
        if len(infos) > max_frames:
            raise PayloadTooLargeError(
                f"the zip holds {len(infos)} frames, over the limit of {max_frames}",
                param="file",
            )
        frames: list[tuple[str, bytes]] = []
        for info in infos:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > max_frame_bytes or ratio > max_ratio:
                raise PayloadTooLargeError(
                    f"frame {info.filename!r} inflates to {info.file_size} bytes "
                    f"({ratio:.0f}x its compressed size): refused (limits: "
                    f"{max_frame_bytes} bytes, {max_ratio}x)",
                    param="file",
                )
            try:
                with archive.open(info) as f:
                    frame = f.read(max_frame_bytes + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
                raise InvalidRequestError(f"frame {info.filename!r}: {e}", param="file") from e
            if len(frame) > max_frame_bytes:
                raise PayloadTooLargeError(
                    f"frame {info.filename!r} inflates past {max_frame_bytes} bytes",
                    param="file",
                )
            frames.append((info.filename, frame))
        return frames


def router(ctx: AppContext) -> APIRouter:
    compat = Compat(ctx)
    api = APIRouter(tags=["compat"])
    has = {key: key in ctx.clients for key in (DETECTOR.key, SAM.key, GROUNDER.key)}
    routes: list[tuple[str, bool, Callable[[Request], Awaitable[dict[str, Any]]]]] = [
        ("/rex_inference", has["detector"], compat.rex_inference),
        ("/api_sam", has["detector"] and has["sam"], compat.api_sam),
        (
            "/api_grounding",
            has["detector"] and has["sam"] and has["grounder"],
            compat.api_grounding,
        ),
        ("/generate_api", bool(ctx.args.model_configs()), compat.generate_api),
        ("/generate_description", compat.vl_model() is not None, compat.generate_description),
        (
            "/upload_and_process_frames",
            compat.vl_model() is not None,
            compat.upload_and_process_frames,
        ),
        ("/extract_from_url", compat.vl_model() is not None, compat.extract),
        ("/extract_text", compat.vl_model() is not None, compat.extract),
    ]
    for path, available, handler in routes:
        if available and ctx.args.compat.on(path):
            api.add_api_route(path, _wrapped(handler), methods=["POST"])
    return api


def _wrapped(
    handler: Callable[[Request], Awaitable[dict[str, Any]]],
) -> Callable[[Request], Awaitable[Any]]:
    async def route(request: Request) -> Any:
        try:
            return await handler(request)
        except Exception as e:
            if not isinstance(unwrap(e), ServeAppError):
                logger.exception("compat route %s failed", request.url.path)
            return _failure(e)

    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    return route
