"""The registry of services: every service of the graph is declared once, here.

One :class:`ServiceSpec` per service says what every target and the ingress need to know:

==============  =================================================================
``name``        the deployment's name (Serve config ``deployments:``, Modal class)
``key``         its field in :data:`AppArgs` (the Serve config's ``args:``), the key of
                its handle and client in the ingress
``config_type`` the type of that field; ``default`` its default (``None``: off unless
                configured). A service set to ``null`` is left out everywhere.
``server``      the class one replica runs (:mod:`serve_apps.replicas`)
``client``      the typed client the ingress calls it with (:mod:`serve_apps.clients`)
``description`` what it serves (``/v1/models``, the docs)
``extras``      the pip extras its replicas need (the Modal image, the docs)
``cpus``        the CPUs a replica asks for when the Serve config does not say
``routers``     the API families it contributes (``serve_apps.routers.<family>:router``),
                mounted when the service is on
``graph``       its server calls the rest of the graph: it is built with ``graph=``
                (:class:`~serve_apps.batch.runner.Graph`: the args and a handle per
                service), after the others (the batch runner)
==============  =================================================================

Everything else derives from the table: :data:`AppArgs` (one optional field per service
plus the shared sections), which services a config turns on, the Ray Serve deployments
(``ray_app``), the Modal classes (``modal_adapter``), the routers the app mounts, the
``/v1/models`` descriptions and the Modal image's extras. Adding a service is one module
(config, server, client, router) and one entry in :data:`SERVICES`.

Importing this module is cheap: server classes import their engines when they start.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, Field, create_model, model_validator

from . import front_door
from .batch.runner import BatchClient, BatchConfig, BatchRunner, Graph
from .clients import Client, DetectorClient, GrounderClient, LLMClient, SegmenterClient
from .config import (
    AdapterConfig,
    AuthConfig,
    CompatConfig,
    DetectorConfig,
    GrounderConfig,
    ImageLimits,
    Limits,
    ModalArgs,
    ModelConfig,
    RateLimits,
    SAMConfig,
    Settings,
)
from .errors import InvalidRequestError, ModelNotFoundError, UnsupportedError
from .replicas.llm import LLMServer
from .replicas.vision import DetectorServer, GrounderServer, SegmenterServer
from .schemas.common import StrictModel

if TYPE_CHECKING:
    from fastapi import APIRouter

    from .handles import Handle

C = TypeVar("C", bound=BaseModel)
K = TypeVar("K", bound=Client)

INGRESS = "Ingress"  # the ingress deployment's name (Serve config, Modal class)
INGRESS_CPUS = 0.25
# Mounted whatever the config: readiness and liveness.
ALWAYS_ROUTERS = ("serve_apps.routers.health:router", "serve_apps.routers.compat:router")


@dataclass(frozen=True, eq=False)
class ServiceSpec(Generic[C, K]):
    """One service of the graph (see the module docstring for what each field feeds)."""

    name: str
    key: str
    config_type: type[C]
    default: C | None
    server: type[Any]
    client: type[K]
    description: str
    extras: tuple[str, ...]
    cpus: float
    routers: tuple[str, ...] = field(default=())
    graph: bool = False

    def build(self, config: C | Mapping[str, Any], **kwargs: Any) -> Any:
        """A (not yet started) server for ``config`` (the config model or its JSON)."""
        if not isinstance(config, BaseModel):
            config = self.config_type.model_validate(config)
        server = self.server(config, **kwargs)
        server.service = self.name  # its name in metrics (serve_apps.service_time)
        return server


LLM = ServiceSpec(
    name="LLM",
    key="llm",
    config_type=ModelConfig,
    # The embedded default ships one smoke LoRA adapter, served as "smoke-llm-lora".
    default=ModelConfig(
        served_model_name="smoke-llm", adapters=[AdapterConfig(name="smoke-llm-lora")]
    ),
    server=LLMServer,
    client=LLMClient,
    description="chat and completions",
    extras=("llm",),
    cpus=0.5,
    routers=("serve_apps.routers.openai:router",),
)
CODEGEN = ServiceSpec(
    name="Codegen",
    key="codegen",
    config_type=ModelConfig,
    default=ModelConfig(served_model_name="smoke-codegen"),
    server=LLMServer,
    client=LLMClient,
    description="constrained generation (JSON schema, regex, grammar)",
    extras=("llm",),
    cpus=0.5,
    routers=("serve_apps.routers.openai:router", "serve_apps.routers.generate:router"),
)
DETECTOR = ServiceSpec(
    name="Detector",
    key="detector",
    config_type=DetectorConfig,
    default=DetectorConfig(),
    server=DetectorServer,
    client=DetectorClient,
    description="vision-language model: /v1/detect (Rex-Omni format) and chat with images",
    extras=("llm", "vision"),
    cpus=0.5,
    routers=("serve_apps.routers.openai:router", "serve_apps.routers.vision:router"),
)
SAM = ServiceSpec(
    name="SAM",
    key="sam",
    config_type=SAMConfig,
    default=SAMConfig(),
    server=SegmenterServer,
    client=SegmenterClient,
    description="segment-anything masks and polygons for boxes (/v1/segment, /v1/ground)",
    extras=("vision",),
    cpus=0.5,
    routers=("serve_apps.routers.vision:router",),
)
GROUNDER = ServiceSpec(
    name="Grounder",
    key="grounder",
    config_type=GrounderConfig,
    default=GrounderConfig(),
    server=GrounderServer,
    client=GrounderClient,
    description="noun phrases of a caption with spaCy (/v1/ground)",
    extras=("vision",),
    cpus=0.1,
    routers=("serve_apps.routers.vision:router",),
)

BATCH = ServiceSpec(
    name="BatchRunner",
    key="batch",
    config_type=BatchConfig,
    default=None,  # off unless the config has a `batch:` section
    server=BatchRunner,
    client=BatchClient,
    description="the OpenAI Batch API: lines answered by the graph, durable, resumable",
    extras=(),
    cpus=0.1,
    routers=("serve_apps.routers.batch:router",),
    graph=True,
)

SERVICES: tuple[ServiceSpec[Any, Any], ...] = (LLM, CODEGEN, DETECTOR, SAM, GROUNDER, BATCH)


def spec(name: str, services: Sequence[ServiceSpec[Any, Any]] = SERVICES) -> ServiceSpec[Any, Any]:
    """The entry of deployment ``name`` (KeyError naming the known ones otherwise)."""
    for s in services:
        if s.name == name:
            return s
    raise KeyError(f"no deployment {name!r}; the graph has {[s.name for s in services]}")


def spec_for_key(
    key: str, services: Sequence[ServiceSpec[Any, Any]] = SERVICES
) -> ServiceSpec[Any, Any]:
    """The entry whose ``AppArgs`` field is ``key``."""
    for s in services:
        if s.key == key:
            return s
    raise KeyError(f"no service {key!r}; the graph has {[s.key for s in services]}")


# --------------------------------------------------------------------------- AppArgs
class AppArgsBase(StrictModel):
    """The Serve application's ``args:``: one field per registered service (added by
    :func:`app_args_type`), plus the sections every app has. Unknown keys are errors."""

    SERVICES: ClassVar[tuple[ServiceSpec[Any, Any], ...]] = ()

    limits: Limits = Limits()
    images: ImageLimits = ImageLimits()
    modal: ModalArgs = ModalArgs()
    compat: CompatConfig = CompatConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimits = RateLimits()

    def config(self, spec: ServiceSpec[C, Any]) -> C | None:
        """The config of one service (None when it is off), typed by its entry."""
        value: C | None = getattr(self, spec.key)
        return value

    def enabled(self) -> list[tuple[ServiceSpec[Any, Any], BaseModel]]:
        """The services this config turns on, each with its config, in registry order."""
        return [(s, cfg) for s in self.SERVICES if (cfg := getattr(self, s.key)) is not None]

    def services(self) -> list[str]:
        """The keys of the services this config turns on."""
        return [s.key for s, _ in self.enabled()]

    def model_configs(self) -> dict[str, ModelConfig]:
        """Key -> model config, for every LLM-style service that is on."""
        return {s.key: cfg for s, cfg in self.enabled() if isinstance(cfg, ModelConfig)}

    @model_validator(mode="after")
    def _modal_classes_exist(self) -> AppArgsBase:
        names = [INGRESS, *(s.name for s in self.SERVICES)]
        unknown = sorted(set(self.modal.classes) - set(names))
        if unknown:
            raise ValueError(f"modal.classes: no deployment named {unknown}; deployments: {names}")
        return self

    @model_validator(mode="after")
    def _unique_model_names(self) -> AppArgsBase:
        names = [n for cfg in self.model_configs().values() for n in cfg.served_names]
        if len(set(names)) != len(names):
            keys = ", ".join(self.model_configs())
            raise ValueError(f"{keys} need different served_model_name values and adapter names")
        return self


def app_args_type(services: Sequence[ServiceSpec[Any, Any]]) -> type[AppArgsBase]:
    """The ``AppArgs`` model of a registry: a field per service, ``null`` turning it off."""
    fields: dict[str, Any] = {
        s.key: (s.config_type | None, Field(default=s.default, description=s.description))
        for s in services
    }
    model = create_model("AppArgs", __base__=AppArgsBase, __module__=__name__, **fields)
    model.SERVICES = tuple(services)
    return model


if TYPE_CHECKING:
    # For type checkers, AppArgs is its base: services are reached through their entry,
    # ``args.config(SAM)``, which is typed by it.
    AppArgs = AppArgsBase
else:
    AppArgs = app_args_type(SERVICES)


def app_args_from_serve_config(config: Mapping[str, Any], app_name: str | None = None) -> AppArgs:
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


def create_servers(args: AppArgsBase, settings: Settings | None = None) -> dict[str, Any]:
    """Key -> a (not yet started) server for every service ``args`` turns on.

    What runs the whole graph in one process (tests, benchmarks): wrap each in a
    ``LocalHandle`` and hand them to ``create_app``.
    """
    from .handles import LocalHandle

    servers = {s.key: s.build(cfg, settings=settings) for s, cfg in args.enabled() if not s.graph}
    handles = {key: LocalHandle(server) for key, server in servers.items()}
    for s, cfg in args.enabled():
        if s.graph:
            servers[s.key] = s.build(cfg, settings=settings, graph=Graph(args, handles))
    return servers


def extras_for(args: AppArgsBase) -> list[str]:
    """The pip extras the replicas of ``args`` need: their services' and their backends'."""
    from .engines import BACKENDS

    extras: dict[str, None] = {}  # ordered, without repeats
    for s, cfg in args.enabled():
        extras.update(dict.fromkeys(s.extras))
        if isinstance(cfg, ModelConfig):
            extras[BACKENDS[cfg.backend].extra] = None
    return list(extras)


# --------------------------------------------------------------------------- the app
@dataclass
class AppContext:
    """What the routers and pipelines of one app see: its args and a client per service."""

    args: AppArgsBase
    clients: Mapping[str, Client]

    @classmethod
    def from_handles(cls, args: AppArgsBase, handles: Mapping[str, Handle]) -> AppContext:
        missing = set(args.services()) - set(handles)
        if missing:
            raise ValueError(f"no handle for services {sorted(missing)}")
        return cls(args, {s.key: s.client(handles[s.key]) for s, _ in args.enabled()})

    def client(self, spec: ServiceSpec[Any, K]) -> K | None:
        """The client of a service, or None when the config leaves it out."""
        found = self.clients.get(spec.key)
        return found if isinstance(found, spec.client) else None

    def require(self, spec: ServiceSpec[Any, K], why: str) -> K:
        """The client of a service ``why`` needs; a 400 saying so when it is not configured."""
        found = self.client(spec)
        if found is None:
            raise UnsupportedError(f"{why} needs the {spec.key} service, which is not configured")
        return found

    def config(self, spec: ServiceSpec[C, Any]) -> C | None:
        return self.args.config(spec)

    @cached_property
    def model_services(self) -> dict[str, str]:
        """Served model name -> service key, for every LLM-style service and adapter."""
        return {
            name: key for key, cfg in self.args.model_configs().items() for name in cfg.served_names
        }

    def model_client(
        self, model: str | None, default: ServiceSpec[Any, LLMClient]
    ) -> tuple[str, LLMClient]:
        """The service that serves ``model`` (by its served name), or the route's default
        service when the request names none: its key and its client."""
        if model is None:
            client = self.client(default)
            if client is None:
                raise InvalidRequestError(
                    f"name a model: the default {default.key} service is not configured",
                    param="model",
                )
            front_door.record_model(self.args.model_configs()[default.key].served_model_name)
            return default.key, client
        key = self.model_services.get(model)
        if key is None:
            raise ModelNotFoundError(
                f"model {model!r} is not served here; available: {sorted(self.model_services)}",
                param="model",
            )
        found = self.clients[key]
        assert isinstance(found, LLMClient)
        config = self.args.model_configs()[key]
        if model != config.served_model_name:  # an adapter: route by its name
            found = found.for_model(model)
        front_door.record_model(model)
        return key, found

    async def reserve_tokens(self, key: str, texts: list[str], max_tokens: int | None) -> None:
        """Reserve a generation's tokens for its API key's tokens-per-minute limit (429
        when they do not fit): its text, and ``max_tokens`` or the model's default."""
        budget = max_tokens or self.args.model_configs()[key].default_max_tokens
        await front_door.reserve_tokens(sum(len(t) for t in texts), budget)

    def routers(self) -> list[APIRouter]:
        """The routers to mount: the ones every app has, then each enabled service's."""
        paths: list[str] = list(ALWAYS_ROUTERS)
        for s, _ in self.args.enabled():
            paths += [p for p in s.routers if p not in paths]
        return [_import(path)(self) for path in paths]


def _import(path: str) -> Callable[[AppContext], APIRouter]:
    module, _, name = path.partition(":")
    factory: Callable[[AppContext], APIRouter] = getattr(importlib.import_module(module), name)
    return factory
