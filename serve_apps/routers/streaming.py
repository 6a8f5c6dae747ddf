"""Server-sent events for the streaming routes.

The status is settled before the first byte: the first item is awaited before the
response starts, so a request error (a bad constraint, a prompt too long) keeps its
status. A later failure goes in-band as ``data: {"error": ...}``, and the stream always
ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..errors import ServeAppError, error_body, unwrap
from ..request_context import current

logger = logging.getLogger(__name__)


def _sse(item: BaseModel | dict[str, Any]) -> str:
    data = item.model_dump_json() if isinstance(item, BaseModel) else json.dumps(item)
    return f"data: {data}\n\n"


async def sse_response(stream: AsyncIterator[Any]) -> StreamingResponse:
    """Server-sent events from a client stream; errors before the first item raise."""
    iterator = aiter(stream)
    try:
        first: Any = await anext(iterator)
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            async for item in iterator:
                yield _sse(item)
        except Exception as e:  # in-band: the status line has already gone out
            err = unwrap(e)
            if not isinstance(err, ServeAppError):
                logger.exception("stream failed", exc_info=err)
            meta = current()
            yield _sse(error_body(err, meta.request_id if meta else None))
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
