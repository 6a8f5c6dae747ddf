"""Read a Serve config the way Ray Serve will run it.

- :func:`load_yaml` parses YAML and reports duplicate keys (YAML keeps the last one
  silently, which is one more way a setting disappears);
- :func:`resolve_deployments` builds each application from its ``import_path`` and
  ``args`` exactly as Serve does (``call_user_app_builder_with_args_if_necessary`` and
  ``build_app``), then applies the config's ``deployments:`` overrides with Serve's rules
  (a field set in the config replaces the code's value, ``ray_actor_options`` as a whole),
  and returns every deployment's effective replica bounds and per-replica Ray resources.
  No deployment name is known in advance: whatever the builder binds is what is resolved.

Ray is imported lazily; it uses Ray-private helpers (``ray.serve._private``), so the
Ray version is pinned (requirements/constraints.txt).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .findings import Finding, join_path


def load_yaml(text: str) -> tuple[Any, list[Finding]]:
    """Parse YAML (:func:`serve_apps.config.parse_yaml`); duplicate keys become error
    findings (with their line)."""
    from serve_apps.config import parse_yaml

    data, duplicates = parse_yaml(text)
    findings = [
        Finding(
            "error",
            f"line {line}",
            f"duplicate key {key!r}: YAML keeps only the last value",
            "remove one of them",
        )
        for key, line in duplicates
    ]
    return data, findings


@dataclass(frozen=True)
class Deployment:
    """One deployment as Serve will run it."""

    app: str
    name: str
    ray_actor_options: Mapping[str, Any]
    # What one replica reserves: Ray's resource dict, or the sum of its placement group.
    resources: Mapping[str, float]
    min_replicas: int
    max_replicas: int
    autoscaling: Mapping[str, Any] | None
    max_replicas_per_node: int | None
    path: str  # the config entry's path, or the app's path when it comes from code only
    from_config: bool
    max_ongoing_requests: int | None = None

    @property
    def key(self) -> str:
        return f"{self.app}/{self.name}"


@dataclass
class Resolution:
    deployments: list[Deployment] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def replica_resources(
    ray_actor_options: Mapping[str, Any],
    placement_group_bundles: list[dict[str, float]] | None = None,
    max_replicas_per_node: int | None = None,
) -> dict[str, float]:
    """Ray Serve's own resource dict for a replica (its defaults: 1 CPU when unset).

    With a placement group, the replica reserves the whole group (its bundles summed).
    Raises ValueError/TypeError on options Ray rejects.
    """
    from ray.serve._private.config import ReplicaConfig

    config = ReplicaConfig.create(
        _Placeholder,
        ray_actor_options=dict(ray_actor_options),
        placement_group_bundles=placement_group_bundles,
        max_replicas_per_node=max_replicas_per_node,
    )
    if placement_group_bundles:
        total: dict[str, float] = {}
        for bundle in placement_group_bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + float(amount)
        return total
    return {k: float(v) for k, v in config.resource_dict.items()}


class _Placeholder:
    """Stands in for the deployment class when only the options are checked."""


def import_builder(import_path: str) -> Any:
    """The object an ``import_path`` names (``module:attr`` or ``module.attr``)."""
    if ":" in import_path:
        module_name, attr = import_path.split(":", 1)
    else:
        module_name, _, attr = import_path.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def _bounds(
    num_replicas: Any, autoscaling: Mapping[str, Any] | None
) -> tuple[int, int, dict[str, Any] | None]:
    from ray.serve.config import AutoscalingConfig

    if num_replicas == "auto":
        merged = AutoscalingConfig.default().model_dump()
        merged.update(dict(autoscaling or {}))
        cfg = AutoscalingConfig(**merged)
        return cfg.min_replicas, cfg.max_replicas, dict(merged)
    if autoscaling:
        cfg = AutoscalingConfig(**dict(autoscaling))
        return cfg.min_replicas, cfg.max_replicas, dict(autoscaling)
    n = 1 if num_replicas is None else int(num_replicas)
    return n, n, None


def resolve_deployments(config: Mapping[str, Any]) -> Resolution:
    """Every deployment of every application, with Serve's override rules applied."""
    out = Resolution()
    apps = config.get("applications")
    if not isinstance(apps, list):
        return out
    for i, app in enumerate(apps):
        if not isinstance(app, Mapping):
            continue
        _resolve_app(app, join_path("applications", i), out)
    return out


def _resolve_app(app: Mapping[str, Any], app_path: str, out: Resolution) -> None:
    app_name = str(app.get("name", "default"))
    entries: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for j, item in enumerate(app.get("deployments") or []):
        if isinstance(item, Mapping) and "name" in item:
            entries[str(item["name"])] = (j, item)

    code = _built_deployments(app, app_path, out)
    if code is None:  # the app could not be built: the config entries are all we know
        code = {}
        for name in entries:
            code[name] = ({}, None, None, None, None)
    else:
        for name, (j, _) in entries.items():
            if name not in code:
                import difflib

                close = difflib.get_close_matches(name, list(code), n=1)
                out.findings.append(
                    Finding(
                        "error",
                        join_path(app_path, "deployments", j, "name"),
                        f"the application builds no deployment named {name!r} (it builds "
                        f"{sorted(code)}); Serve rejects the config at deploy time",
                        close[0] if close else None,
                    )
                )

    for name, (actor_options, num_replicas, autoscaling, bundles, per_node) in code.items():
        j_entry = entries.get(name)
        entry: Mapping[str, Any] = j_entry[1] if j_entry else {}
        path = (
            join_path(app_path, "deployments", j_entry[0])
            if j_entry
            else f"{join_path(app_path, 'deployments')}[name={name}]"
        )
        if j_entry is None:
            out.findings.append(
                Finding(
                    "warning",
                    join_path(app_path, "deployments"),
                    f"deployment {name!r} has no entry: it runs with the code's defaults "
                    f"(ray_actor_options={dict(actor_options or {})})",
                    f"add - name: {name} with its resources and autoscaling_config",
                )
            )
        options = entry.get("ray_actor_options", actor_options) or {}
        if "num_replicas" in entry or "autoscaling_config" in entry:
            num_replicas = entry.get("num_replicas")
            autoscaling = entry.get("autoscaling_config")
        bundles = entry.get("placement_group_bundles", bundles)
        per_node = entry.get("max_replicas_per_node", per_node)
        try:
            lo, hi, scaling = _bounds(num_replicas, autoscaling)
            resources = replica_resources(options, bundles, per_node)
        except Exception as e:  # Ray's own validation message is the reason
            out.findings.append(
                Finding("error", path, f"Ray rejects this deployment's options: {e}")
            )
            continue
        out.deployments.append(
            Deployment(
                app=app_name,
                name=name,
                ray_actor_options=dict(options),
                resources=resources,
                min_replicas=lo,
                max_replicas=hi,
                autoscaling=scaling,
                max_replicas_per_node=per_node,
                path=path,
                from_config=j_entry is not None,
                max_ongoing_requests=entry.get("max_ongoing_requests"),
            )
        )


_CodeOptions = tuple[
    Mapping[str, Any] | None,  # ray_actor_options
    Any,  # num_replicas
    Mapping[str, Any] | None,  # autoscaling_config
    list[dict[str, float]] | None,  # placement_group_bundles
    int | None,  # max_replicas_per_node
]


def _built_deployments(
    app: Mapping[str, Any], app_path: str, out: Resolution
) -> dict[str, _CodeOptions] | None:
    """The deployments the app's builder binds, with the options set in code."""
    import_path = app.get("import_path")
    if not isinstance(import_path, str):
        return None
    try:
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
        from ray.serve._private.build_app import build_app

        builder = import_builder(import_path)
        application = call_user_app_builder_with_args_if_necessary(
            builder, dict(app.get("args") or {})
        )
        built = build_app(application, name=str(app.get("name", "default")))
    except Exception as e:
        out.findings.append(
            Finding(
                "warning",
                join_path(app_path, "import_path"),
                f"could not build {import_path!r} here ({type(e).__name__}: {e}); deployment "
                "names and code defaults are not checked, only the config's entries",
            )
        )
        return None
    result: dict[str, _CodeOptions] = {}
    for d in built.deployments:
        dc = d._deployment_config
        rc = d._replica_config
        autoscaling = dc.autoscaling_config.model_dump() if dc.autoscaling_config else None
        result[d.name] = (
            d.ray_actor_options,
            dc.num_replicas,
            autoscaling,
            rc.placement_group_bundles,
            rc.max_replicas_per_node,
        )
    return result
