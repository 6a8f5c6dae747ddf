"""Engines: model code behind small base classes. No ray or modal imports here.

Engines are created by name from config (:func:`create_llm_engine`); each backend's module
is imported only when selected, so a config that uses transformers never imports vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .base import LLMEngine


def resolve_model(config: ModelConfig, settings: Settings) -> str:
    """The ``from_pretrained`` argument for a model config: its id/path, or the smoke model."""
    if config.model is not None:
        return config.model
    from .smoke import smoke_llm_path

    return str(smoke_llm_path(settings.cache_dir))


def create_llm_engine(config: ModelConfig, model: str) -> LLMEngine:
    """The engine named by ``config.backend`` for ``model`` (a resolved id or path)."""
    if config.backend == "transformers":
        from .transformers_llm import TransformersEngine

        return TransformersEngine(
            model,
            revision=config.revision,
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
        )
    raise ValueError(f"unknown LLM backend {config.backend!r}")
