"""Ray Serve adapter: the deployments of the graph and ``build_app(args)``.

``build_app`` is the ``import_path`` target of ``config.yaml`` (``serve run``, KubeRay's
``serveConfigV2``) and what the tests deploy. It validates ``args`` as :class:`AppArgs`
(unknown keys fail here) and binds::

One deployment per entry of the registry (:mod:`serve_apps.registry`: names, servers,
default CPUs) that the config turns on::

    Ingress ──> LLM       (LLMServer on the llm model)
            ├─> Codegen   (LLMServer on the codegen model)
            ├─> Detector  (DetectorServer: LLMServer on the vision-language model + detect)
            ├─> SAM       (SegmenterServer)
            └─> Grounder  (GrounderServer)

The vision deployments are separate so that each gets its own resources (in production,
its own GPU pool); a config that sets ``detector``, ``sam`` or ``grounder`` to null
leaves that deployment out.

Deployment options (replicas, autoscaling, resources) come from the ``deployments:``
section of the Serve config, which overrides the defaults below; the defaults are only
what a bare ``serve.run(build_app({}))`` uses. The one exception is set here from the
model config: a vLLM replica's placement-group bundles for its engine's workers
(:func:`serve_apps.placement.replica_placement`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from functools import cache
from typing import Any, cast

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from . import metrics
from .batch.runner import Graph
from .config import KeyLimits, ModelConfig, RateLimits
from .errors import InvalidRequestError, OverloadedError, UnavailableError, unwrap
from .ingress import create_app
from .ratelimit import Counters, Decision, SharedCounters, local_counters
from .registry import INGRESS, INGRESS_CPUS, AppArgs, AppArgsBase, ServiceSpec
from .request_context import RequestMeta, bind, current, install_log_context
from .worker_bundles import replica_placement

__all__ = ["RayCounters", "RayHandle", "bind_graph", "build_app"]

logger = logging.getLogger(__name__)


def _replica_setup() -> None:
    """What every replica process of the app does first: record metrics through Ray's
    metrics (Ray's Prometheus exporter), and send our package's log lines where the
    replica's own Serve log lines go (its log file; JSON with
    ``LoggingConfig(encoding="JSON")``), with Serve's request ID and ours (the same
    value) and the API key's name."""
    metrics.use_ray()
    install_log_context()
    ours, serve_logger = logging.getLogger("serve_apps"), logging.getLogger("ray.serve")
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    if serve_logger.handlers:
        ours.propagate = False
        if ours.level == logging.NOTSET:
            ours.setLevel(serve_logger.level or logging.INFO)


RATE_LIMIT_NAMESPACE = "serve_apps"


class RayCounters:
    """The rate-limit counters of one Serve application in one named Ray actor, which
    every ingress replica finds by name (``get_if_exists``): the limits hold however many
    ingress replicas there are. The actor runs calls one at a time, so each step is atomic.
    Detached, so it outlives the replica that happened to create it."""

    def __init__(self, app_name: str, storage_uri: str = "memory://"):
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=-1)(Counters)
        self.name = f"rate-limits:{app_name}"
        self._actor: Any = actor.options(
            name=self.name,
            namespace=RATE_LIMIT_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
        ).remote(storage_uri)

    async def admit(self, key: str, limits: KeyLimits) -> Decision:
        decision: Decision = await self._actor.admit.remote(key, limits)
        return decision

    async def reserve(self, key: str, limits: KeyLimits, amount: int) -> Decision:
        decision: Decision = await self._actor.reserve.remote(key, limits, amount)
        return decision

    async def settle(self, key: str, limits: KeyLimits, delta: int, window_reset_at: float) -> None:
        # Not awaited: nothing waits for it, and Ray runs an actor's calls from one caller in
        # the order they were made, so this replica's next admit/reserve sees it settled.
        self._actor.settle.remote(key, limits, delta, window_reset_at)


def shared_counters(config: RateLimits) -> SharedCounters | None:
    """Where an ingress replica counts: ``auto``: the application's :class:`RayCounters`;
    ``memory``: this replica alone; a ``limits`` URI: that storage."""
    if not config.enabled:
        return None
    if config.storage != "auto":
        return local_counters(config)
    return RayCounters(serve.get_replica_context().app_name)


class RayHandle:
    """:class:`serve_apps.handles.Handle` over a Ray Serve ``DeploymentHandle``.

    Ray Serve retries a request only until a replica accepts it; a replica that dies
    while holding it fails it with ``RayActorError`` (ActorDiedError, ActorUnavailableError).
    Before any byte of the answer exists, that is retried once (Serve routes the retry to
    a live replica); after that, or mid-stream, it is a 503 with ``Retry-After``. A caller
    that gives up (client gone, deadline) cancels the replica's work.
    """

    RETRIES = 1

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    def for_model(self, model_id: str) -> RayHandle:
        """This handle with Ray Serve's multiplexed model id set: requests go to replicas
        that already hold ``model_id`` (an adapter), see ``Replica.invoke``."""
        return RayHandle(self._handle.options(multiplexed_model_id=model_id))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self.RETRIES + 1):
            response = self._handle.invoke.remote(method, current(), args, kwargs)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except RayActorError as e:
                if attempt == self.RETRIES:
                    raise self._replica_lost(e) from e
                logger.warning("a %s replica died holding a request; retrying", self._name)
            except BackPressureError as e:
                raise OverloadedError(str(e), retry_after_s=e.retry_after_s) from e
            except Exception as e:
                raise unwrap(e) from e
        raise AssertionError("unreachable")

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for attempt in range(self.RETRIES + 1):
            response = cast(
                DeploymentResponseGenerator,
                self._handle.options(stream=True).invoke_stream.remote(
                    method, current(), args, kwargs
                ),
            )
            started = False
            try:
                async for item in response:
                    started = True
                    yield item
                return
            except RayActorError as e:
                if started or attempt == self.RETRIES:
                    raise self._replica_lost(e) from e
                logger.warning("a %s replica died before streaming; retrying", self._name)
            except BackPressureError as e:
                raise OverloadedError(str(e), retry_after_s=e.retry_after_s) from e
            except Exception as e:
                raise unwrap(e) from e
            finally:
                # Client gone or stream done: cancel the replica-side generator (no-op if done).
                response.cancel()

    @property
    def _name(self) -> str:
        return str(getattr(self._handle, "deployment_name", "service"))

    def _replica_lost(self, e: BaseException) -> UnavailableError:
        return UnavailableError(
            f"the {self._name} replica serving this request stopped ({type(e).__name__}); "
            "retry shortly"
        )


def _takes_placement_group(server_class: type) -> bool:
    return "placement_group" in inspect.signature(server_class).parameters


def _server_method(server: Any, name: str) -> Any:
    """A public method of the server (the names a client can reach)."""
    if name.startswith("_") or name in ("invoke", "invoke_stream", "check_health"):
        raise InvalidRequestError(f"{type(server).__name__} has no public method {name!r}")
    return getattr(server, name)


def _replica_class(spec: ServiceSpec[Any, Any]) -> type:
    """The Ray Serve replica class of one registry entry: its server, built and started."""
    server_class = spec.server

    class Replica(server_class):  # type: ignore[misc, valid-type]
        service = spec.name  # its name in metrics (serve_apps.service_time)

        async def __init__(  # type: ignore[misc]
            self,
            config: dict[str, Any],
            graph: tuple[dict[str, Any], dict[str, DeploymentHandle]] | None = None,
        ):
            from ray.util import get_current_placement_group

            kwargs: dict[str, Any] = {}
            if graph is not None:  # a service that calls the others (ServiceSpec.graph)
                graph_args, graph_handles = graph
                kwargs["graph"] = Graph(
                    AppArgs.model_validate(graph_args),
                    {k: RayHandle(h) for k, h in graph_handles.items()},
                )
            # A vLLM replica with several workers gets a placement group (build_app,
            # serve_apps.placement); its engine schedules the workers into it. Servers that
            # run in the replica process alone take none, whatever the config reserved.
            placement_group = get_current_placement_group()
            if placement_group is not None and _takes_placement_group(server_class):
                kwargs["placement_group"] = placement_group
            _replica_setup()
            parsed = server_class.config_type.model_validate(config)
            super().__init__(parsed, **kwargs)
            await self.start()
            self._multiplexed: Any = None
            if isinstance(parsed, ModelConfig) and parsed.adapters:
                # Ray Serve's model multiplexing: the adapters this replica holds (an LRU
                # of max_loaded_adapters, the engine's own bound) are reported to the
                # routers, which send requests for one to the replicas holding it.
                server = self

                async def hold(model_id: str) -> str:
                    held: str = await server.hold_adapter(model_id)
                    return held

                self._multiplexed = serve.multiplexed(
                    max_num_models_per_replica=parsed.max_loaded_adapters
                )(hold)

        async def check_health(self) -> None:
            # Ray calls this periodically; a dead engine makes the replica unhealthy.
            await self.health()

        async def invoke(
            self, method: str, meta: RequestMeta | None, args: tuple[Any, ...], kwargs: Any
        ) -> Any:
            """What every RayHandle call arrives as: the request's meta bound, then the
            server's ``method``."""
            with bind(meta):
                await self._hold_multiplexed()
                return await _server_method(self, method)(*args, **kwargs)

        async def invoke_stream(
            self, method: str, meta: RequestMeta | None, args: tuple[Any, ...], kwargs: Any
        ) -> AsyncIterator[Any]:
            with bind(meta):
                await self._hold_multiplexed()
                async for item in _server_method(self, method)(*args, **kwargs):
                    yield item

        async def _hold_multiplexed(self) -> None:
            """Mark the request's adapter (its multiplexed model id) used on this replica."""
            model_id = serve.get_multiplexed_model_id()
            if model_id and self._multiplexed is not None:
                await self._multiplexed(model_id)

        async def replica_stats(self) -> dict[str, Any]:
            """The server's stats and which replica answered (tests, benchmarks)."""
            stats: dict[str, Any] = await self.stats()
            return {"replica": serve.get_replica_context().replica_id.unique_id, **stats}

    Replica.__name__ = Replica.__qualname__ = f"{spec.name}Replica"
    return Replica


class _IngressReplica:
    """The FastAPI ingress; it holds a handle per service."""

    def __init__(self, args: dict[str, Any], handles: dict[str, DeploymentHandle]):
        _replica_setup()
        app_args = AppArgs.model_validate(args)
        self._app = create_app(
            app_args,
            {k: RayHandle(h) for k, h in handles.items()},
            counters=shared_counters(app_args.rate_limits),
            echo_adopted_id=False,  # Serve's proxy returns it
        )

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


@cache
def deployment(spec: ServiceSpec[Any, Any]) -> serve.Deployment:
    """The Ray Serve deployment of a registry entry. The Serve config's ``deployments:``
    entry of the same name overrides the default options given here."""
    return serve.deployment(ray_actor_options={"num_cpus": spec.cpus})(_replica_class(spec))


IngressDeployment = serve.deployment(ray_actor_options={"num_cpus": INGRESS_CPUS})(
    serve.ingress()(_IngressReplica)
)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The typed app builder: ``args`` (the Serve config's ``args:``) -> the bound graph."""
    return bind_graph(AppArgs.model_validate(args or {}))


def bind_graph(
    args: AppArgsBase, options: Mapping[str, Mapping[str, Any]] | None = None
) -> serve.Application:
    """The graph for validated ``args``. ``options`` (deployment name -> Serve deployment
    options, e.g. ``{"LLM": {"num_replicas": 2}}``) does in Python what a Serve config's
    ``deployments:`` entries do: benchmarks and tests shape the graph with it."""
    options = options or {}
    services: dict[str, Any] = {}
    args_json = args.model_dump(mode="json")
    # Services that call the graph are bound last, with the handles of the others.
    for spec, config in sorted(args.enabled(), key=lambda item: item[0].graph):
        chosen: dict[str, Any] = {"name": spec.name}
        if isinstance(config, ModelConfig):
            chosen.update(replica_placement(config))
        chosen.update(options.get(spec.name, {}))
        bind_args: list[Any] = [config.model_dump(mode="json")]
        if spec.graph:
            bind_args.append((args_json, dict(services)))
        services[spec.key] = deployment(spec).options(**chosen).bind(*bind_args)
    ingress = IngressDeployment.options(name=INGRESS, **options.get(INGRESS, {}))
    return ingress.bind(args_json, services)
