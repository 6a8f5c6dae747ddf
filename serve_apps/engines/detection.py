"""Rex-Omni's detection format: prompts, the output grammar, and the output parser.

Rex-Omni (IDEA-Research/Rex-Omni, a fine-tuned Qwen2.5-VL) answers "Detect person, car."
with text like::

    <|object_ref_start|>person<|object_ref_end|><|box_start|><23><294><106><525>,<80><286>
    <146><515><|box_end|>, <|object_ref_start|>car<|object_ref_end|><|box_start|>None<|box_end|>

- an item per category: the phrase between ``<|object_ref_start|>`` / ``<|object_ref_end|>``,
  then the shapes between ``<|box_start|>`` / ``<|box_end|>``; items joined by ``", "``;
- shapes joined by ``","``: ``<x><y>`` a point, ``<x0><y0><x1><y1>`` a box (a longer even
  run is a polygon); ``None`` when the category is absent;
- coordinates are bins 0..999 relative to the *original* image size: ``bin = int(v / size
  * 999)`` and back ``v = bin / 999 * size`` (the model's own resize does not matter).

In training every asked category is answered once, in the order asked (absent ones with
``None``; ``GroundingTaskFn.compose_answer``). :func:`detection_grammar` turns that into
an llguidance Lark grammar for one request (its categories, its task), so constrained
generation can only produce text that :func:`parse_prediction` parses into the asked
categories with shapes of the asked type, whatever the weights. :func:`parse_prediction`
itself reads any Rex-Omni output (it is written to give the same result as upstream
``rex_omni/parser.py``'s ``parse_standard_prediction``, tolerating a truncated last item
and dropping malformed shapes), so it also serves unconstrained output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from typing import Any, Literal

from ..vision_checks import check_category

Task = Literal["detection", "pointing"]

# rex_omni/tasks.py TASK_CONFIGS (IDEA-Research/Rex-Omni@478e44f).
PROMPTS: dict[str, str] = {
    "detection": (
        "Detect {categories}. Output the bounding box coordinates in [x0, y0, x1, y1] format."
    ),
    "pointing": "Point to {categories}.",
}
# RexOmniWrapper's default system prompt (no final period; training used one).
SYSTEM_PROMPT = "You are a helpful assistant"
# Coordinates per shape for each task.
SHAPE_SIZE: dict[str, int] = {"detection": 4, "pointing": 2}
SHAPE_TYPE: dict[str, str] = {"detection": "box", "pointing": "point"}

OBJECT_START, OBJECT_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
END_OF_TURN = "<|im_end|>"
N_BINS = 1000

_ITEM = re.compile(
    r"<\|object_ref_start\|>\s*([^<]+?)\s*<\|object_ref_end\|>\s*<\|box_start\|>(.*?)<\|box_end\|>"
)
_COORD = re.compile(r"<(\d+)>")


def build_prompt(task: str, categories: Sequence[str]) -> str:
    """The user prompt for ``task`` over ``categories`` (Rex-Omni's wording)."""
    return PROMPTS[task].format(categories=", ".join(categories))


def to_bin(value: float, size: float) -> int:
    """Pixel coordinate -> Rex-Omni bin (0..999), as Rex-Omni encodes visual prompts."""
    return max(0, min(N_BINS - 1, int(max(0.0, min(1.0, value / size)) * (N_BINS - 1))))


def from_bin(index: int, size: float) -> float:
    """Rex-Omni bin -> pixel coordinate in an image of ``size`` pixels along that axis."""
    return index / (N_BINS - 1) * size


def parse_prediction(text: str, width: int, height: int) -> dict[str, list[dict[str, Any]]]:
    """``{category: [{"type": "box" | "point" | "polygon", "coords": [...]}, ...]}``.

    Box and point coords are flat pixel lists, polygon coords ``[[x, y], ...]``. Text after
    ``<|im_end|>`` is ignored; a last item cut off by ``max_tokens`` still counts; shapes
    with an odd or too small number of coordinates are dropped; ``None`` gives an empty
    list; a category that appears twice collects both items' shapes.

    The grammar guarantees the format, not the geometry: a box is always returned as
    ``x1 <= x2, y1 <= y2`` (corners given the other way round are swapped), and a box with
    no area (``x1 == x2`` or ``y1 == y2``) is dropped, since it is no region to segment.
    """
    text = text.split(END_OF_TURN)[0]
    if not text.endswith(BOX_END):
        text += BOX_END
    result: dict[str, list[dict[str, Any]]] = {}
    for phrase, body in _ITEM.findall(text):
        shapes: list[dict[str, Any]] = []
        for part in body.split(","):
            bins = [int(b) for b in _COORD.findall(part)]
            xs = [from_bin(b, width) for b in bins[0::2]]
            ys = [from_bin(b, height) for b in bins[1::2]]
            if len(bins) == 2:
                shapes.append({"type": "point", "coords": [xs[0], ys[0]]})
            elif len(bins) == 4:
                (x1, x2), (y1, y2) = sorted(xs), sorted(ys)
                if x1 < x2 and y1 < y2:
                    shapes.append({"type": "box", "coords": [x1, y1, x2, y2]})
            elif len(bins) > 4 and len(bins) % 2 == 0:
                shapes.append(
                    {"type": "polygon", "coords": [[x, y] for x, y in zip(xs, ys, strict=True)]}
                )
        result.setdefault(phrase.strip(), []).extend(shapes)
    return result


def _lark_string(text: str) -> str:
    # llguidance's Lark reads JSON-style string literals.
    return json.dumps(text, ensure_ascii=False)


def coordinate_rule(special_tokens: Collection[str]) -> str:
    """Lark alternatives for one coordinate token ``<0>``..``<999>``.

    When the constraint backend treats them as special tokens (llguidance does for every
    added token, and Rex-Omni's are added tokens) the grammar must name them as tokens: a
    quoted ``"<123>"`` would only match that text spelled out in ordinary tokens, which is
    not how the model writes coordinates. A tokenizer without such tokens gets strings.
    """
    names = (f"<{i}>" for i in range(N_BINS))
    return " | ".join(n if n in special_tokens else _lark_string(n) for n in names)


def detection_grammar(
    categories: Sequence[str],
    task: str,
    special_tokens: Collection[str],
    max_shapes: int | None = None,
) -> str:
    """An llguidance Lark grammar of the answer to :func:`build_prompt` (task, categories).

    The answer names a non-empty subset of ``categories``, each at most once and in the
    order asked (training answers every category, in order), each with ``None`` or up to
    ``max_shapes`` shapes of the task's type. The structural tokens are special tokens of
    Qwen's tokenizer and are referenced as tokens; the end of turn is left to the engine
    (EOS is allowed once the grammar is complete).
    """
    if not categories:
        raise ValueError("at least one category is needed")
    for c in categories:
        if (why := check_category(c)) is not None:
            raise ValueError(f"category {c!r} {why}")
    n = len(categories)
    size = SHAPE_SIZE[task]
    more = "*" if max_shapes is None else f"{{0,{max_shapes - 1}}}"
    lines = [
        "start: s0",
        f'shapes: "None" | shape ("," shape){more}',
        "shape: " + " ".join(["c"] * size),
        "c: " + coordinate_rule(special_tokens),
    ]
    for i, category in enumerate(categories):
        lines.append(
            f"item{i}: {OBJECT_START} {_lark_string(category)} {OBJECT_END} "
            f"{BOX_START} shapes {BOX_END}"
        )
        # s_i: a non-empty ordered choice among categories i..n-1.
        if i == n - 1:
            lines.append(f"s{i}: item{i}")
        else:
            lines.append(f's{i}: item{i} (", " s{i + 1})? | s{i + 1}')
    return "\n".join(lines) + "\n"


def predictions_for_task(
    predictions: dict[str, list[dict[str, Any]]], task: str, categories: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Only the asked categories (each present, maybe empty) and shapes of the task's type."""
    wanted = SHAPE_TYPE[task]
    return {c: [s for s in predictions.get(c, []) if s["type"] == wanted] for c in categories}
