"""Servers: what one deployment runs, on any target (Ray Serve, Modal, in-process).

A server owns one engine and speaks the wire schemas; the target adapters (``ray_app``,
``modal_adapter``) only wrap it. Methods that stream are async generators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import AppArgs, Settings


def create_servers(args: AppArgs, settings: Settings | None = None) -> dict[str, Any]:
    """Service name -> a (not yet started) server for every service of ``args``.

    What runs the whole graph in one process: wrap each in a ``LocalHandle`` and hand them
    to ``create_app``. Every server has ``start()``, ``health()`` and ``shutdown()``.
    """
    from ..graph import enabled

    return {spec.service: spec.build(config, settings=settings) for spec, config in enabled(args)}
