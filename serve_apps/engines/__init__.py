"""Engines: model code behind small base classes. No ray or modal imports here.

LLM engines are selected by name from config (``ModelConfig.backend``) in
:data:`BACKENDS`; each backend's module is imported only when selected, so a config that
uses transformers never imports vLLM. A new backend is a module with an
:class:`~.base.LLMEngine` subclass (its ``from_config`` maps the model config onto its
options) and one line here. The vision engines (:mod:`.segmenter`, :mod:`.grounder`) and
Rex-Omni's format (:mod:`.detection`) are used by the vision servers directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .adapters import AdapterSource
    from .base import LLMEngine


@dataclass(frozen=True)
class Backend:
    """An LLM engine backend: its engine class per modality ("module:Class"; None: the
    backend does not serve that modality) and the pip extra it needs."""

    text: str
    image_text: str | None
    extra: str

    def engine_path(self, modality: str) -> str | None:
        return self.text if modality == "text" else self.image_text


BACKENDS: dict[str, Backend] = {
    "transformers": Backend(
        text="serve_apps.engines.transformers_llm:TransformersEngine",
        image_text="serve_apps.engines.transformers_vl:TransformersVLEngine",
        extra="llm",
    ),
    "vllm": Backend(
        text="serve_apps.engines.vllm_llm:VLLMEngine",
        image_text="serve_apps.engines.vllm_vl:VLLMVLEngine",
        extra="vllm",
    ),
}


def resolve_model(config: ModelConfig, settings: Settings) -> str:
    """The ``from_pretrained`` argument for a model config: its id/path, or the smoke model.

    With ``settings.offline_models`` a Hub model resolves to its provisioned snapshot
    directory (``serve_apps.provision``), or fails naming the prefetch command.
    """
    if config.model is not None:
        if settings.offline_models:
            from ..provision import HubModel, hub_snapshot, is_hub_id

            if is_hub_id(config.model):
                return str(hub_snapshot(HubModel(config.model, config.revision), settings))
        return config.model
    from .smoke import smoke_llm_path, smoke_vl_path

    if config.modality == "image-text":
        return str(smoke_vl_path(settings.cache_dir))
    return str(smoke_llm_path(settings.cache_dir))


def resolve_adapters(config: ModelConfig, settings: Settings) -> dict[str, AdapterSource]:
    """Name -> where the weights are, for every adapter of ``config`` (smoke ones built)."""
    from .adapters import AdapterSource

    sources: dict[str, AdapterSource] = {}
    for adapter in config.adapters:
        if adapter.path is None:
            from .smoke import smoke_lora_path

            path = str(smoke_lora_path(settings.cache_dir, adapter.seed))
        else:
            path = adapter.path
        sources[adapter.name] = AdapterSource(adapter.name, path, adapter.revision)
    return sources


def create_llm_engine(
    config: ModelConfig,
    model: str,
    *,
    placement_group: Any = None,
    adapters: dict[str, AdapterSource] | None = None,
) -> LLMEngine:
    """The engine ``config.backend`` names for ``model`` (a resolved id or path).

    ``placement_group`` is what a serving target reserved for the engine's workers (Ray
    Serve's replica placement group, see :mod:`serve_apps.worker_bundles`); engines that
    spread over several devices use it, the others ignore it. ``adapters`` are the config's
    LoRA adapters, resolved (:func:`resolve_adapters`).
    """
    path = BACKENDS[config.backend].engine_path(config.modality)
    if path is None:  # ModelConfig refuses this when it is parsed
        raise ValueError(f"backend {config.backend} serves no {config.modality} models")
    module, _, name = path.partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    engine: LLMEngine = engine_class.from_config(
        config, model, placement_group=placement_group, adapters=adapters
    )
    return engine
