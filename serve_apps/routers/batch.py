"""The OpenAI Batch API: ``/v1/files`` and ``/v1/batches``.

The ingress keeps files and batches in the store (:mod:`serve_apps.batch.store`), which
the runner deployment (:mod:`serve_apps.batch.runner`) reads its work from; the ingress
never waits for a batch. A batch's ``status`` and ``request_counts`` are its progress.

Extension: ``POST /v1/batches`` takes ``webhook_url``, called when the batch ends
(:mod:`serve_apps.batch.webhooks`); with the official client, pass it in ``extra_body``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import Field

from ..batch.lines import ENDPOINTS
from ..batch.runner import WINDOWS_S, BatchConfig
from ..batch.store import BatchStore
from ..batch.webhooks import check_url
from ..errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, UnsupportedError
from ..registry import BATCH, DETECTOR, GROUNDER, SAM, AppContext
from ..schemas.common import StrictModel

Endpoint = Literal[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/generate",
    "/v1/detect",
    "/v1/segment",
    "/v1/ground",
]


class BatchCreateRequest(StrictModel):
    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="called with the batch object when it ends"
    )


def served_endpoints(ctx: AppContext) -> set[str]:
    """The batch endpoints whose routes this app mounts."""
    served: set[str] = set()
    if ctx.args.model_configs():
        served |= {"/v1/chat/completions", "/v1/completions", "/v1/generate"}
    detector, sam, grounder = ctx.client(DETECTOR), ctx.client(SAM), ctx.client(GROUNDER)
    if detector is not None:
        served.add("/v1/detect")
    if sam is not None:
        served.add("/v1/segment")
    if detector is not None and sam is not None and grounder is not None:
        served.add("/v1/ground")
    return served & set(ENDPOINTS)


def check_jsonl(data: bytes) -> None:
    """A batch input file: UTF-8, every non-empty line a JSON object (400 naming the line)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the file is not UTF-8: {e}", param="file") from e
    count = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(
                f"line {number} is not JSON: {e}", param="file", code="invalid_jsonl"
            ) from e
        if not isinstance(item, dict):
            raise InvalidRequestError(
                f"line {number} is not a JSON object", param="file", code="invalid_jsonl"
            )
        count += 1
    if not count:
        raise InvalidRequestError("the file has no lines", param="file", code="invalid_jsonl")


def router(ctx: AppContext) -> APIRouter:
    config = ctx.config(BATCH)
    assert isinstance(config, BatchConfig)
    store = BatchStore(config.store_path())
    served = served_endpoints(ctx)
    api = APIRouter(tags=["batch"])

    def found(value: dict[str, Any] | None, what: str, name: str) -> dict[str, Any]:
        if value is None:
            raise NotFoundError(f"no {what} {name!r}", param=f"{what}_id")
        return value

    @api.post("/v1/files")
    async def create_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        if purpose != "batch":
            raise UnsupportedError(
                f"purpose {purpose!r} is not supported; upload batch input with purpose 'batch'",
                param="purpose",
            )
        data = await file.read(config.max_file_bytes + 1)
        if len(data) > config.max_file_bytes:
            raise PayloadTooLargeError(
                f"the file is over the {config.max_file_bytes}-byte limit", param="file"
            )
        check_jsonl(data)
        name = file.filename or "input.jsonl"
        return await asyncio.to_thread(store.add_file, data, name, purpose)

    @api.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        return found(await asyncio.to_thread(store.get_file, file_id), "file", file_id)

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        data = await asyncio.to_thread(store.file_content, file_id)
        if data is None:
            raise NotFoundError(f"no file {file_id!r}", param="file_id")
        return Response(data, media_type="application/jsonl")

    @api.post("/v1/batches")
    async def create_batch(req: BatchCreateRequest) -> dict[str, Any]:
        if req.endpoint not in served:
            raise UnsupportedError(
                f"endpoint {req.endpoint} is not served here; batches can use {sorted(served)}",
                param="endpoint",
            )
        if await asyncio.to_thread(store.get_file, req.input_file_id) is None:
            raise NotFoundError(f"no file {req.input_file_id!r}", param="input_file_id")
        if req.webhook_url is not None:
            await check_url(req.webhook_url, config.webhook_allow_private_urls)
        return await asyncio.to_thread(
            store.create_batch,
            req.endpoint,
            req.input_file_id,
            req.completion_window,
            req.metadata,
            req.webhook_url,
            WINDOWS_S[req.completion_window],
        )

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return found(await asyncio.to_thread(store.get_batch, batch_id), "batch", batch_id)

    @api.get("/v1/batches")
    async def list_batches(
        after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> dict[str, Any]:
        data, more = await asyncio.to_thread(store.list_batches, after, limit)
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        return found(await asyncio.to_thread(store.request_cancel, batch_id), "batch", batch_id)

    return api
