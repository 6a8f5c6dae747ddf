"""Small helpers shared by the HTTP tests."""

from __future__ import annotations

import json
from typing import Any

import httpx


def sse_events(text: str) -> list[Any]:
    """Parse a server-sent-events body into JSON payloads; "[DONE]" stays a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block!r}"
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_envelope(
    response: httpx.Response, status: int, code: str | None = None, *, success: bool = False
) -> dict[str, Any]:
    """The response is an error of ``status`` in the shared envelope; returns the error.
    ``success=True``: a compat route's error, the envelope plus ``"success": false``."""
    assert response.status_code == status, response.text
    body = response.json()
    if success:
        assert body.get("success") is False, body
        body = {k: v for k, v in body.items() if k != "success"}
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) - {"request_id"} == {"message", "type", "param", "code"}, err
    if "request_id" in err:
        assert response.headers.get_list("x-request-id") == [err["request_id"]], err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def scene_png(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """A small synthetic photo stand-in: a few filled shapes on a gradient (PNG bytes).

    Shapes compress well, so it stays a few kilobytes: under the contract app's limits.
    """
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        shade = int(60 + 120 * y / max(1, height - 1))
        draw.line([(0, y), (width, y)], fill=(shade, shade, 200 - shade // 2))
    for _ in range(4):
        x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
        x1, y1 = x0 + rng.randrange(8, width // 2), y0 + rng.randrange(8, height // 2)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


# A bounded JSON schema the engine tests constrain to (a random model can finish it).
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "ok"],
    "additionalProperties": False,
}
