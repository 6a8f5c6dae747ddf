"""Engines: model code behind small base classes. No ray or modal imports here.

LLM engines are created by name from config (:func:`create_llm_engine`); each backend's
module is imported only when selected, so a config that uses transformers never imports
vLLM. The vision engines (:mod:`.segmenter`, :mod:`.grounder`) and Rex-Omni's format
(:mod:`.detection`) are used by the vision servers directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .base import LLMEngine


def resolve_model(config: ModelConfig, settings: Settings) -> str:
    """The ``from_pretrained`` argument for a model config: its id/path, or the smoke model."""
    if config.model is not None:
        return config.model
    from .smoke import smoke_llm_path, smoke_vl_path

    if config.modality == "image-text":
        return str(smoke_vl_path(settings.cache_dir))
    return str(smoke_llm_path(settings.cache_dir))


def create_llm_engine(config: ModelConfig, model: str, *, placement_group: Any = None) -> LLMEngine:
    """The engine named by ``config.backend`` for ``model`` (a resolved id or path).

    ``placement_group`` is what a serving target reserved for the engine's workers (Ray
    Serve's replica placement group, see :mod:`serve_apps.placement`); engines that spread
    over several devices use it, the others ignore it.
    """
    common: dict[str, Any] = {
        "revision": config.revision,
        "max_batch_size": config.max_batch_size,
        "max_queue": config.max_queue,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "device": config.device,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.backend == "transformers":
        if config.modality == "image-text":
            from .transformers_vl import TransformersVLEngine

            return TransformersVLEngine(
                model,
                image_min_pixels=config.image_min_pixels,
                image_max_pixels=config.image_max_pixels,
                **common,
            )
        from .transformers_llm import TransformersEngine

        return TransformersEngine(model, **common)
    if config.backend == "vllm":
        from .vllm_llm import VLLMEngine

        opts = config.vllm_options
        return VLLMEngine(
            model,
            **common,
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            kv_cache_memory_bytes=opts.kv_cache_memory_bytes,
            quantization=opts.quantization,
            enforce_eager=opts.enforce_eager,
            placement_group=placement_group,
        )
    raise ValueError(f"unknown LLM backend {config.backend!r}")
