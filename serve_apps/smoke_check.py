"""A smoke test of a running app: every route it serves called once, a pass/fail table.

    python -m serve_apps.smoke_check http://127.0.0.1:8000        # `serve run`, a port-forward
    SERVE_APPS_MODAL_MODE=dev modal run modal_adapter/app.py::smoke_test   # the Modal app

The routes come from the app's own ``/openapi.json`` and the model names from
``/v1/models``, so the same script checks any config on any target: a route without a
request here is a failure (add one to :data:`REQUESTS`), not a silent skip. Exit status 0
only when every row passes. Needs httpx only (the base install).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

Body = dict[str, Any] | bytes | None  # JSON, or a zip upload (application/zip)
Cards = dict[str, str]  # service -> served model name


def tiny_png(width: int = 64, height: int = 48) -> bytes:
    """A PNG (a dark square on grey) without an imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b""
    for y in range(height):
        row = b"".join(
            b"\x20\x20\x80" if 16 <= x < 48 and 12 <= y < 36 else b"\xc0\xc0\xc0"
            for x in range(width)
        )
        rows += b"\x00" + row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


IMAGE = base64.b64encode(tiny_png()).decode()


def frames_zip() -> bytes:
    """A zip of one frame, as Cogniverse uploads them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("frames/frame_000.png", tiny_png())
    return buffer.getvalue()


def _chat(cards: Cards) -> Body:
    messages = [{"role": "user", "content": "Say hello."}]
    return {"model": cards.get("llm"), "messages": messages, "max_tokens": 8}


# (method, path) -> the request body, from the model cards; one documented request each.
REQUESTS: dict[tuple[str, str], Callable[[Cards], Body]] = {
    ("GET", "/health"): lambda cards: None,
    ("GET", "/v1/models"): lambda cards: None,
    ("POST", "/v1/chat/completions"): _chat,
    ("POST", "/v1/completions"): lambda cards: {
        "model": cards.get("llm"),
        "prompt": "Hello",
        "max_tokens": 8,
    },
    ("POST", "/v1/generate"): lambda cards: {
        "prompt": "A number between 1 and 999:",
        "constraints": {"regex": "[1-9][0-9]{0,2}"},
        "max_tokens": 8,
    },
    ("POST", "/v1/detect"): lambda cards: {"image": IMAGE, "categories": ["square"]},
    ("POST", "/v1/segment"): lambda cards: {"image": IMAGE, "boxes": [[16, 12, 48, 36]]},
    ("POST", "/v1/ground"): lambda cards: {"image": IMAGE, "caption": "a dark square"},
    ("GET", "/metrics"): lambda cards: None,
    # The seeds' routes (serve_apps.routers.compat), as their clients send them.
    ("POST", "/rex_inference"): lambda cards: {
        "image": IMAGE,
        "task": "detection",
        "categories": ["square"],
    },
    ("POST", "/api_sam"): lambda cards: {"image": IMAGE, "categories": ["square"]},
    ("POST", "/api_grounding"): lambda cards: {"image": IMAGE, "caption": "a dark square"},
    ("POST", "/generate_api"): lambda cards: {
        "prompt": "A number:",
        "constraints": {"regex_patterns": ["[0-9]{1,3}"]},
        "max_tokens": 8,
    },
    ("POST", "/generate_description"): lambda cards: {"frame_base64": IMAGE, "prompt": "Describe."},
    ("POST", "/upload_and_process_frames"): lambda cards: frames_zip(),
    ("POST", "/extract_from_url"): lambda cards: {"image": IMAGE},
    ("POST", "/extract_text"): lambda cards: {"image": IMAGE},
}
SKIPPED_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    status: int | None
    ok: bool
    seconds: float
    detail: str


async def routes(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """(method, path) of every operation in the app's OpenAPI document."""
    response = await client.get("/openapi.json")
    response.raise_for_status()
    return [
        (method.upper(), path)
        for path, operations in response.json()["paths"].items()
        if path not in SKIPPED_PATHS
        for method in operations
    ]


async def _call(client: httpx.AsyncClient, method: str, path: str, cards: Cards) -> Row:
    make = REQUESTS.get((method, path))
    if make is None:
        return Row(method, path, None, False, 0.0, "no smoke request for this route")
    started = time.perf_counter()
    try:
        body = make(cards)
        if isinstance(body, bytes):
            headers = {"content-type": "application/zip"}
            response = await client.request(method, path, content=body, headers=headers)
        else:
            response = await client.request(method, path, json=body)
    except httpx.HTTPError as e:
        return Row(method, path, None, False, time.perf_counter() - started, repr(e)[:120])
    seconds = time.perf_counter() - started
    ok = response.status_code == 200
    detail = "" if ok else response.text[:120].replace("\n", " ")
    return Row(method, path, response.status_code, ok, seconds, detail)


async def run(client: httpx.AsyncClient) -> list[Row]:
    """Every route once, one after another (a smoke test, not a load test)."""
    ops = await routes(client)
    models = await client.get("/v1/models")
    cards: Cards = {}
    if models.status_code == 200:
        for card in models.json().get("data", []):
            cards.setdefault(card.get("service", ""), card["id"])
    return [await _call(client, method, path, cards) for method, path in ops]


def table(rows: list[Row]) -> str:
    lines = [f"{'result':6}  {'status':6}  {'seconds':>7}  route"]
    for r in rows:
        status = str(r.status) if r.status is not None else "-"
        line = f"{'PASS' if r.ok else 'FAIL':6}  {status:6}  {r.seconds:7.2f}  {r.method} {r.path}"
        lines.append(line + (f"  {r.detail}" if r.detail else ""))
    passed = sum(r.ok for r in rows)
    lines.append(f"{passed}/{len(rows)} routes passed")
    return "\n".join(lines)


async def check_url(url: str, timeout_s: float = 600.0, api_key: str | None = None) -> list[Row]:
    """Run the smoke test against a base URL (a cold start may take minutes: long timeout)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers) as client:
        return await run(client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_apps.smoke_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("url", help="base URL of the app, e.g. http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ns = parser.parse_args(argv)
    rows = asyncio.run(check_url(ns.url.rstrip("/"), ns.timeout))
    print(table(rows))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
