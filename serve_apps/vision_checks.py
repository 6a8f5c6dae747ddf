"""Checks of vision requests shared by the ingress pipelines and the vision services.

The ingress (``pipelines/vision.py``) runs them before it fetches or decodes an image, so a
request that a service would refuse costs no download, no decoding and no model work; the
services (``servers/vision.py``, ``engines/segmenter.py``) run the same functions on what
reaches them through a handle. Neither side imports the other: this module imports only
:mod:`serve_apps.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import InvalidRequestError

# What a Rex-Omni category may not contain: "<" and ">" would break the output format,
# "," the prompt (categories are joined with ", "), control characters everything.
_BAD_CATEGORY = re.compile(r"[<>,\x00-\x1f\x7f]")


def check_category(category: str) -> str | None:
    """Why ``category`` cannot be asked of the detector, or None if it can."""
    if not category.strip():
        return "is empty"
    if _BAD_CATEGORY.search(category):
        return "contains one of < > , or a control character"
    return None


def validate_categories(categories: Sequence[str], limit: int) -> list[str]:
    """Stripped, deduplicated categories that Rex-Omni's format can carry; else a 400."""
    out: list[str] = []
    for category in categories:
        why = check_category(category)
        if why is not None:
            raise InvalidRequestError(
                f"category {category!r} {why}", param="categories", code="invalid_category"
            )
        category = category.strip()
        if category not in out:
            out.append(category)
    if len(out) > limit:
        raise InvalidRequestError(
            f"{len(out)} categories is over the detector's limit of {limit}",
            param="categories",
            code="too_many_categories",
        )
    return out


def check_box_count(count: int, limit: int) -> None:
    """SAM's per-request box limit (400 ``too_many_boxes``)."""
    if count > limit:
        raise InvalidRequestError(
            f"{count} boxes is over this service's limit of {limit}",
            param="boxes",
            code="too_many_boxes",
        )


def check_caption(caption: str, limit: int) -> None:
    """The grounder's caption length limit (400 ``caption_too_long``)."""
    if len(caption) > limit:
        raise InvalidRequestError(
            f"caption is {len(caption)} characters, over the limit of {limit}",
            param="caption",
            code="caption_too_long",
        )
