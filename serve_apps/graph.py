"""The graph's deployments, target-neutral: the one table every target adapter reads.

Each entry names a deployment (its key in the Serve config's ``deployments:`` list, and
the Modal class name), the :class:`~serve_apps.config.AppArgs` field that configures it
(also the key of its handle in the ingress) and the server class it runs. From this table:

- ``serve_apps.ray_app`` binds one Ray Serve deployment per entry;
- ``modal_adapter`` generates one Modal class per entry;
- :func:`serve_apps.replicas.create_servers` builds the whole graph in one process.

A service whose ``AppArgs`` field is null (e.g. ``sam: null``) is left out everywhere.
Importing this module is cheap: server classes are imported when first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from .config import AppArgs

INGRESS = "Ingress"


class Server(Protocol):
    """What every deployment runs: built from its config, then started once."""

    async def start(self) -> None: ...
    async def health(self) -> Any: ...
    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class DeploymentSpec:
    name: str  # Serve config `deployments:` name and Modal class name
    service: str  # AppArgs field and ingress handle key
    server_path: str  # "module:Class" of the server, imported lazily
    cpus: float  # CPUs a replica asks for when the Serve config does not say

    def server_class(self) -> Any:
        module, _, name = self.server_path.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, config: BaseModel | Mapping[str, Any], **kwargs: Any) -> Any:
        """A (not yet started) server for ``config`` (a config model or its JSON dict)."""
        cls = self.server_class()
        if not isinstance(config, BaseModel):
            config = cls.config_type.model_validate(config)
        return cls(config, **kwargs)


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec("LLM", "llm", "serve_apps.replicas.llm:LLMServer", cpus=0.5),
    DeploymentSpec("Codegen", "codegen", "serve_apps.replicas.llm:LLMServer", cpus=0.5),
    DeploymentSpec("Detector", "detector", "serve_apps.replicas.vision:DetectorServer", cpus=0.5),
    DeploymentSpec("SAM", "sam", "serve_apps.replicas.vision:SegmenterServer", cpus=0.5),
    DeploymentSpec("Grounder", "grounder", "serve_apps.replicas.vision:GrounderServer", cpus=0.1),
)
INGRESS_CPUS = 0.25

SERVICE_DEPLOYMENTS: dict[str, str] = {d.service: d.name for d in DEPLOYMENTS}


def spec(name: str) -> DeploymentSpec:
    """The entry of deployment ``name`` (KeyError with the known names otherwise)."""
    for d in DEPLOYMENTS:
        if d.name == name:
            return d
    raise KeyError(f"no deployment {name!r}; the graph has {[d.name for d in DEPLOYMENTS]}")


def enabled(args: AppArgs) -> list[tuple[DeploymentSpec, BaseModel]]:
    """The deployments ``args`` turns on, each with its config."""
    return [(d, cfg) for d in DEPLOYMENTS if (cfg := getattr(args, d.service)) is not None]
