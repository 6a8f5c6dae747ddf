"""Ray Serve adapter: the deployments of the graph and ``build_app(args)``.

``build_app`` is the ``import_path`` target of ``config.yaml`` (``serve run``, KubeRay's
``serveConfigV2``) and what the tests deploy. It validates ``args`` as :class:`AppArgs`
(unknown keys fail here) and binds::

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

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from .config import AppArgs, DetectorConfig, GrounderConfig, ModelConfig, SAMConfig
from .errors import OverloadedError, unwrap
from .ingress import create_app
from .placement import replica_placement
from .servers.llm import LLMServer
from .servers.vision import DetectorServer, GrounderServer, SegmenterServer

# Deployment names: the keys of the Serve config's `deployments:` list and of the
# Modal classes. The ingress knows the others by service name.
INGRESS = "Ingress"
SERVICE_DEPLOYMENTS = {
    "llm": "LLM",
    "codegen": "Codegen",
    "detector": "Detector",
    "sam": "SAM",
    "grounder": "Grounder",
}


class RayHandle:
    """:class:`serve_apps.handles.Handle` over a Ray Serve ``DeploymentHandle``."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args, **kwargs)
        except BackPressureError as e:
            raise OverloadedError(str(e)) from e
        except Exception as e:
            raise unwrap(e) from e

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        response: DeploymentResponseGenerator = getattr(
            self._handle.options(stream=True), method
        ).remote(*args, **kwargs)
        try:
            async for item in response:
                yield item
        except BackPressureError as e:
            raise OverloadedError(str(e)) from e
        except Exception as e:
            raise unwrap(e) from e
        finally:
            # Client gone or stream done: cancel the replica-side generator (no-op if done).
            response.cancel()


class _LLMReplica(LLMServer):
    """An ``LLMServer`` as a Ray Serve replica."""

    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]
        from ray.util import get_current_placement_group

        # Set when build_app gave this deployment placement-group bundles for the
        # engine's workers (serve_apps.placement); the engine schedules them into it.
        super().__init__(
            ModelConfig.model_validate(config), placement_group=get_current_placement_group()
        )
        await self.start()

    async def check_health(self) -> None:
        # Ray calls this periodically; a dead engine makes the replica unhealthy.
        await self.health()


class _DetectorReplica(DetectorServer):
    """A ``DetectorServer`` as a Ray Serve replica."""

    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]
        super().__init__(DetectorConfig.model_validate(config))
        await self.start()

    async def check_health(self) -> None:
        await self.health()


class _SAMReplica(SegmenterServer):
    """A ``SegmenterServer`` as a Ray Serve replica."""

    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]
        super().__init__(SAMConfig.model_validate(config))
        await self.start()

    async def check_health(self) -> None:
        await self.health()


class _GrounderReplica(GrounderServer):
    """A ``GrounderServer`` as a Ray Serve replica."""

    async def __init__(self, config: dict[str, Any]):  # type: ignore[misc]
        super().__init__(GrounderConfig.model_validate(config))
        await self.start()

    async def check_health(self) -> None:
        await self.health()


class _IngressReplica:
    """The FastAPI ingress; it holds a handle per service."""

    def __init__(self, args: dict[str, Any], handles: dict[str, DeploymentHandle]):
        self._app = create_app(
            AppArgs.model_validate(args), {k: RayHandle(h) for k, h in handles.items()}
        )

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


LLMDeployment = serve.deployment(ray_actor_options={"num_cpus": 0.5})(_LLMReplica)
DetectorDeployment = serve.deployment(ray_actor_options={"num_cpus": 0.5})(_DetectorReplica)
SAMDeployment = serve.deployment(ray_actor_options={"num_cpus": 0.5})(_SAMReplica)
GrounderDeployment = serve.deployment(ray_actor_options={"num_cpus": 0.1})(_GrounderReplica)
IngressDeployment = serve.deployment(ray_actor_options={"num_cpus": 0.25})(
    serve.ingress()(_IngressReplica)
)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The typed app builder: ``args`` (the Serve config's ``args:``) -> the bound graph."""
    parsed = AppArgs.model_validate(args or {})
    services = {
        service: LLMDeployment.options(
            name=SERVICE_DEPLOYMENTS[service], **replica_placement(cfg)
        ).bind(cfg.model_dump(mode="json"))
        for service, cfg in parsed.model_configs().items()
        if service != "detector"
    }
    if parsed.detector is not None:
        services["detector"] = DetectorDeployment.options(
            name=SERVICE_DEPLOYMENTS["detector"]
        ).bind(parsed.detector.model_dump(mode="json"))
    if parsed.sam is not None:
        services["sam"] = SAMDeployment.options(name=SERVICE_DEPLOYMENTS["sam"]).bind(
            parsed.sam.model_dump(mode="json")
        )
    if parsed.grounder is not None:
        services["grounder"] = GrounderDeployment.options(
            name=SERVICE_DEPLOYMENTS["grounder"]
        ).bind(parsed.grounder.model_dump(mode="json"))
    return IngressDeployment.options(name=INGRESS).bind(parsed.model_dump(mode="json"), services)
