"""Replicas: what one deployment of the graph runs, on any target (Ray Serve, Modal, in-process).

A server owns its engine and speaks the wire schemas (:mod:`serve_apps.schemas`); the target
adapters (``ray_app``, ``modal_adapter``) only host it, and the ingress reaches it through a
typed client (:mod:`serve_apps.clients`). Methods that stream are async generators. Which
server runs in which deployment is the registry's business (:mod:`serve_apps.registry`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from pydantic import BaseModel


class Server(Protocol):
    """What every deployment runs: built from its config, started once, then served."""

    config_type: ClassVar[type[BaseModel]]

    async def start(self) -> None: ...
    async def health(self) -> Any: ...
    async def shutdown(self) -> None: ...
