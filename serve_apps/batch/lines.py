"""Batch input lines: what each endpoint takes, their checks, and OpenAI's output format.

An input file is JSONL, one request per line (OpenAI's format)::

    {"custom_id": "a", "method": "POST", "url": "/v1/detect", "body": {...}}

A line's ``url`` is the batch's ``endpoint`` or (an extension: one batch of mixed work)
another batch endpoint. Checked before the batch starts (:func:`parse_input`), each
problem reported with its 1-based line number: a line that is not a JSON object, a
missing or repeated ``custom_id``, a method other than POST, a URL that is no batch
endpoint, a body that is not an
object or asks to stream. Any of these fails the batch (nothing runs). A body that does
not validate against the endpoint's request model is noted with its line number too, and
runs anyway: the app answers it with the same 400 an HTTP client would get, which goes
to the error file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..schemas.generate import GenerateRequest
from ..schemas.openai import ChatCompletionRequest, CompletionRequest
from ..schemas.vision import DetectRequest, GroundRequest, SegmentRequest

# Endpoint -> the request model of its route, and the service that answers it unless the
# body's `model` names another (the key of the per-service concurrency limit).
ENDPOINTS: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "llm"),
    "/v1/completions": (CompletionRequest, "llm"),
    "/v1/generate": (GenerateRequest, "codegen"),
    "/v1/detect": (DetectRequest, "detector"),
    "/v1/segment": (SegmentRequest, "sam"),
    "/v1/ground": (GroundRequest, "detector"),
}


@dataclass(frozen=True)
class BatchLine:
    index: int  # 0-based position among the request lines (the result's key)
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def number(self) -> int:
        return self.index + 1


def _problem(number: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": f"line {number}: {message}", "param": param, "line": number}


def parse_input(
    data: bytes, endpoint: str, max_lines: int
) -> tuple[list[BatchLine], list[dict[str, Any]], list[dict[str, Any]]]:
    """The lines of an input file; the problems that fail the batch; notes on bodies
    that will be answered with a 400 (both as OpenAI batch ``errors`` entries)."""
    lines: list[BatchLine] = []
    problems: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [_problem(1, "invalid_file", f"the file is not UTF-8 ({e})")], []
    raw_lines = [(i, raw) for i, raw in enumerate(text.splitlines()) if raw.strip()]
    if not raw_lines:
        return [], [_problem(1, "empty_file", "the file has no request lines")], []
    if len(raw_lines) > max_lines:
        message = f"the file has {len(raw_lines)} lines; a batch takes at most {max_lines}"
        return [], [_problem(max_lines + 1, "too_many_lines", message)], []
    for index, (file_line, raw) in enumerate(raw_lines):
        number = file_line + 1
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(_problem(number, "invalid_json_line", f"not JSON: {e}"))
            continue
        if not isinstance(item, dict):
            problems.append(_problem(number, "invalid_json_line", "not a JSON object"))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problems.append(_problem(number, "missing_custom_id", "no custom_id", "custom_id"))
            continue
        if custom_id in seen:
            problems.append(
                _problem(number, "duplicate_custom_id", f"custom_id {custom_id!r} repeats")
            )
            continue
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            problems.append(_problem(number, "invalid_method", "method must be POST", "method"))
            continue
        url = item.get("url", endpoint)
        if url not in ENDPOINTS:
            problems.append(
                _problem(
                    number,
                    "invalid_url",
                    f"url {url!r} is not a batch endpoint ({', '.join(ENDPOINTS)})",
                    "url",
                )
            )
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            problems.append(_problem(number, "invalid_body", "body must be an object", "body"))
            continue
        if body.get("stream"):
            problems.append(_problem(number, "invalid_body", "batch lines cannot stream", "body"))
            continue
        try:
            ENDPOINTS[url][0].model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            notes.append(_problem(number, "invalid_request", f"{where}: {first.get('msg')}", where))
        lines.append(BatchLine(index, custom_id, url, body))
    return lines, problems, notes


def output_line(
    batch_id: str, line: int, custom_id: str, status: int, request_id: str, body: Any
) -> dict[str, Any]:
    """One line of the output (2xx) or error file, in OpenAI's format."""
    error = None
    if not 200 <= status < 300:
        inner = body.get("error") if isinstance(body, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        error = {"code": inner.get("code"), "message": inner.get("message", f"HTTP {status}")}
    return {
        "id": f"batch_req_{batch_id.removeprefix('batch-')}_{line}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }
