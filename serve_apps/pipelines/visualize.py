"""``visualize: true``: the result drawn on the image, as a PNG data URL.

Masks are filled translucent, boxes outlined, points marked, each in its category's
colour, with the category written at the box. The overlay is drawn on a copy scaled to
at most ``MAX_SIDE`` pixels on its long side, so a large photo does not become a PNG of
tens of megabytes.
"""

from __future__ import annotations

import base64
import colorsys
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

MAX_SIDE = 1024


@dataclass
class Overlay:
    boxes: list[tuple[str, Sequence[float]]] = field(default_factory=list)
    points: list[tuple[str, Sequence[float]]] = field(default_factory=list)
    polygons: list[tuple[str, Sequence[Sequence[int]]]] = field(default_factory=list)


def _colour(label: str, labels: list[str]) -> tuple[int, int, int]:
    # Evenly spaced hues in order of first appearance: distinct for a handful of labels.
    i = labels.index(label)
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def render_png(image: Image.Image, overlay: Overlay) -> str:
    """``data:image/png;base64,...`` of ``image`` with ``overlay`` drawn on it."""
    from PIL import Image, ImageDraw

    scale = min(1.0, MAX_SIDE / max(image.size))
    base = image.convert("RGBA")
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        base = base.resize(size, Image.Resampling.BILINEAR)
    labels: list[str] = []
    for label, _ in [*overlay.polygons, *overlay.boxes, *overlay.points]:
        if label not in labels:
            labels.append(label)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for label, polygons in overlay.polygons:
        r, g, b = _colour(label, labels)
        for flat in polygons:
            points = [(flat[i] * scale, flat[i + 1] * scale) for i in range(0, len(flat) - 1, 2)]
            if len(points) >= 3:
                draw.polygon(points, fill=(r, g, b, 90), outline=(r, g, b, 220))
    width = max(2, round(max(base.size) / 300))
    for label, box in overlay.boxes:
        colour = (*_colour(label, labels), 255)
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle(
            (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=width
        )
        draw.text((min(x1, x2) + width, min(y1, y2) + width), label, fill=colour)
    for label, point in overlay.points:
        colour = (*_colour(label, labels), 255)
        x, y = point[0] * scale, point[1] * scale
        radius = 2 * width
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        draw.text((x + radius, y + radius), label, fill=colour)
    out = io.BytesIO()
    Image.alpha_composite(base, layer).convert("RGB").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
