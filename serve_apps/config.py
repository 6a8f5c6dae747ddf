"""Typed configuration: the ``args:`` of the Serve config, and the process environment.

``AppArgs`` is what ``build_app(args)`` receives from ``config.yaml``; every model here
forbids unknown keys so that a typo fails at ``serve run`` time instead of being ignored.
``Settings`` is the only place the environment is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .schemas.common import StrictModel

# The embedded default is a model the project builds itself (random weights); see
# serve_apps/engines/smoke.py. ``model: null`` in the config selects it.
SMOKE_DESCRIPTION = (
    "smoke model: a real Qwen2 architecture with random weights and a locally trained "
    "tokenizer, built by this project from a fixed seed. Its answers are well-formed "
    "but meaningless; configure a real model for real output."
)


class Settings(BaseSettings):
    """Process environment (``SERVE_APPS_*``)."""

    model_config = SettingsConfigDict(env_prefix="SERVE_APPS_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "serve_apps",
        description="where the smoke models are built and kept",
    )


class VLLMOptions(StrictModel):
    """Engine options of the vLLM backend (``backend: vllm``); names follow vLLM's engine args.

    The model's ``dtype``, ``max_model_len``, ``max_batch_size`` (vLLM's ``max_num_seqs``),
    ``revision`` and ``trust_remote_code`` come from :class:`ModelConfig` itself.
    """

    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="GPUs (workers) one replica shards the model over"
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="fraction of each GPU's memory for weights + KV cache (null: vLLM's "
        "default); on vLLM's CPU build it is the fraction of RAM",
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None,
        ge=2**20,
        description="explicit KV cache size per worker, instead of sizing it from "
        "gpu_memory_utilization (what the CPU build needs)",
    )
    quantization: str | None = Field(
        default=None,
        min_length=1,
        description="vLLM quantization method (awq, gptq, fp8, ...); null: from the checkpoint",
    )
    enforce_eager: bool = Field(
        default=False, description="skip CUDA graphs / torch.compile: faster start, slower steps"
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="Ray placement-group strategy for the replica's per-worker bundles",
    )


class ModelConfig(StrictModel):
    """One LLM-style model and the engine that serves it."""

    backend: Literal["transformers", "vllm"] = "transformers"
    model: str | None = Field(
        default=None, description="HF model id or local path; null = the embedded smoke model"
    )
    revision: str | None = None
    served_model_name: str = Field(min_length=1)
    max_batch_size: int = Field(default=8, ge=1, le=512)
    max_queue: int = Field(default=256, ge=1, description="waiting requests before 503")
    max_model_len: int | None = Field(default=None, ge=16)
    default_max_tokens: int = Field(default=256, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = False
    vllm: VLLMOptions | None = Field(
        default=None, description="vLLM engine options; only with backend: vllm"
    )

    @model_validator(mode="after")
    def _backend_options(self) -> ModelConfig:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"`vllm:` options need `backend: vllm` (backend is {self.backend!r})")
        if self.backend == "vllm" and self.device not in ("auto", "cpu", "cuda"):
            # vLLM picks its devices itself (CUDA_VISIBLE_DEVICES, Ray placement groups).
            raise ValueError(
                f"backend vllm takes device auto, cuda or cpu, not {self.device!r}; "
                "choose GPUs with tensor_parallel_size and the replica's resources"
            )
        return self

    @property
    def is_smoke(self) -> bool:
        return self.model is None

    @property
    def vllm_options(self) -> VLLMOptions:
        """The vLLM options, defaults filled in (meaningful with ``backend: vllm``)."""
        return self.vllm if self.vllm is not None else VLLMOptions()


class Limits(StrictModel):
    """Per-request limits the ingress enforces before any model sees the request."""

    max_tokens: int = Field(default=4096, ge=1, description="largest max_tokens a request may ask")
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)


class AppArgs(StrictModel):
    """``args:`` of the Serve application (``serve_apps.ray_app:build_app``)."""

    llm: ModelConfig = ModelConfig(served_model_name="smoke-llm")
    codegen: ModelConfig = ModelConfig(served_model_name="smoke-codegen")
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _unique_names(self) -> AppArgs:
        if self.llm.served_model_name == self.codegen.served_model_name:
            raise ValueError("llm and codegen need different served_model_name values")
        return self

    def model_configs(self) -> dict[str, ModelConfig]:
        """Service name -> model config, for every LLM-style service."""
        return {"llm": self.llm, "codegen": self.codegen}


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (YAML) as a dict."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Serve config is a mapping, got {type(data).__name__}")
    return data


def app_args_from_serve_config(config: dict[str, Any], app_name: str | None = None) -> AppArgs:
    """The validated ``AppArgs`` of one application of a Serve config (the first by default)."""
    apps = config.get("applications") or []
    if not apps:
        raise ValueError("the Serve config has no applications")
    if app_name is None:
        app = apps[0]
    else:
        matches = [a for a in apps if a.get("name") == app_name]
        if not matches:
            raise ValueError(f"no application named {app_name!r} in the Serve config")
        app = matches[0]
    return AppArgs.model_validate(app.get("args") or {})
