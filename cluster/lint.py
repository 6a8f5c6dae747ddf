"""Strict linter for a Ray Serve config file.

Ray Serve 2.60's pydantic schemas do not forbid unknown keys: a typo (``min_replica``,
``num_gpu``) or an old name (``max_concurrent_queries``) is dropped silently and the
deployment runs with a default. This linter walks the config against Ray's own schema
models (``ray.serve.schema.ServeDeploySchema`` and the models its fields point to, read
from their pydantic field definitions, so the allowed keys are Ray's, not a hand copy)
and reports, for each problem, the path, the reason and a suggestion. It also:

- runs Ray's own validation (types, ``num_replicas`` vs ``autoscaling_config``, ...);
- reports duplicate YAML keys and deprecated fields;
- validates ``args`` against the app's typed model when the ``import_path`` is ours
  (``serve_apps.ray_app:build_app`` -> :class:`serve_apps.config.AppArgs`);
- builds each application as Serve does, checks the deployment names, and places every
  deployment on a pool (:mod:`cluster.pools`) on every cloud: an accelerator no pool
  provides, a replica bigger than its pool's node, or replica bounds that need more
  nodes than the pool allows are errors.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .findings import Finding, errors, join_path
from .placement import plan
from .pools import CLOUDS
from .serve_config import load_yaml, resolve_deployments

# Import paths whose `args:` have a typed model here: "module:builder" -> "module:Model".
ARGS_MODELS = {"serve_apps.ray_app:build_app": "serve_apps.registry:AppArgs"}

# Keys Ray renamed or moved: (the model's name or "*", old key) -> what to write instead.
KNOWN_RENAMES: dict[tuple[str, str], str] = {
    ("DeploymentSchema", "max_concurrent_queries"): "max_ongoing_requests",
    ("AutoscalingConfig", "target_num_ongoing_requests_per_replica"): "target_ongoing_requests",
    ("AutoscalingConfig", "target_ongoing_requests_per_replica"): "target_ongoing_requests",
    ("DeploymentSchema", "route_prefix"): "route_prefix on the application, not the deployment",
    ("DeploymentSchema", "min_replicas"): "autoscaling_config.min_replicas",
    ("DeploymentSchema", "max_replicas"): "autoscaling_config.max_replicas",
    ("DeploymentSchema", "num_gpus"): "ray_actor_options.num_gpus",
    ("DeploymentSchema", "num_cpus"): "ray_actor_options.num_cpus",
    ("DeploymentSchema", "accelerator_type"): "ray_actor_options.accelerator_type",
    ("ServeDeploySchema", "import_path"): "applications: [{import_path: ...}]",
    ("ServeDeploySchema", "deployments"): "applications[].deployments",
    ("ServeDeploySchema", "host"): "http_options.host",
    ("ServeDeploySchema", "port"): "http_options.port",
}

DEPRECATION_NOTES = {
    "metrics_interval_s": (
        "deprecated, but in Ray 2.60 still the only setting of the autoscaling metrics push "
        "interval (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S are read by nothing)"
    ),
}


def lint_file(path: str | Path) -> list[Finding]:
    return lint_text(Path(path).read_text())


def lint_text(text: str) -> list[Finding]:
    data, findings = load_yaml(text)
    if not isinstance(data, Mapping):
        return [*findings, Finding("error", "", "a Serve config is a mapping")]
    return findings + lint_config(data)


def lint_config(config: Mapping[str, Any]) -> list[Finding]:
    """Every finding for a parsed Serve config, errors first."""
    from ray.serve.schema import ServeDeploySchema

    findings: list[Finding] = []
    _walk(config, ServeDeploySchema, "", findings)
    findings += _ray_validation(config)
    args_ok = True
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, Mapping):
            args_ok &= _check_args(app, join_path("applications", i), findings)
    if not errors(findings) and args_ok:
        resolution = resolve_deployments(config)
        findings += resolution.findings
        for cloud in CLOUDS:
            _, placed = plan(resolution.deployments, cloud, unpinned_is_error=False)
            findings += placed
    return _dedupe(findings)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[Finding] = set()
    out = []
    for f in findings:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return sorted(out, key=lambda f: f.severity != "error")


# --- unknown keys, against Ray's pydantic models -------------------------------------


def _models_in(annotation: Any) -> tuple[str, type | None]:
    """('model' | 'list' | 'dict', the pydantic model inside) for a field annotation."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, typing.List):  # noqa: UP006 - Ray's annotations use typing.List
        kind, model = _models_in(args[0]) if args else ("model", None)
        return ("list", model) if kind == "model" else (kind, None)
    if origin in (dict, typing.Dict):  # noqa: UP006
        return "dict", None
    for arg in args:  # Optional / Union / Annotated: the first model wins
        kind, model = _models_in(arg)
        if model is not None:
            return kind, model
    return "model", None


def _walk(value: Any, model: type, path: str, findings: list[Finding]) -> None:
    if not isinstance(value, Mapping):
        return  # wrong types are reported by Ray's own validation
    fields = model.model_fields  # type: ignore[attr-defined]
    by_key = {name: name for name in fields}
    by_key.update({f.alias: name for name, f in fields.items() if f.alias})
    for key, sub in value.items():
        here = join_path(path, str(key))
        name = by_key.get(key)
        if name is None:
            findings.append(_unknown_key(model.__name__, str(key), list(by_key), here))
            continue
        field = fields[name]
        if (field.description or "").startswith("[DEPRECATED]") or field.deprecated:
            note = DEPRECATION_NOTES.get(name, field.description or "deprecated")
            findings.append(Finding("warning", here, note))
        kind, submodel = _models_in(field.annotation)
        if submodel is None:
            continue
        if kind == "list" and isinstance(sub, list):
            for i, item in enumerate(sub):
                _walk(item, submodel, join_path(here, i), findings)
        elif kind == "model":
            _walk(sub, submodel, here, findings)


def _unknown_key(model: str, key: str, allowed: list[str], path: str) -> Finding:
    rename = KNOWN_RENAMES.get((model, key))
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    suggestion = rename or (close[0] if close else None)
    why = " (an old name that Ray no longer reads)" if rename else ""
    return Finding(
        "error",
        path,
        f"unknown key {key!r} in Ray Serve's {model}{why}: Ray Serve 2.60 drops it "
        "silently and runs with the default",
        suggestion,
    )


def _ray_validation(config: Mapping[str, Any]) -> list[Finding]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [
            Finding("error", join_path("", *err["loc"]), f"Ray Serve rejects it: {err['msg']}")
            for err in e.errors()
        ]
    return []


# --- args, against the app's typed model ---------------------------------------------


def _check_args(app: Mapping[str, Any], app_path: str, findings: list[Finding]) -> bool:
    from pydantic import ValidationError

    model_path = ARGS_MODELS.get(str(app.get("import_path")))
    if model_path is None:
        return True
    from .serve_config import import_builder

    model = import_builder(model_path)
    try:
        args = model.model_validate(app.get("args") or {})
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            path = join_path(join_path(app_path, "args"), *loc)
            suggestion = None
            if err["type"] == "extra_forbidden":
                names = _field_names_at(model, loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
                suggestion = close[0] if close else f"one of {names}"
            findings.append(
                Finding("error", path, f"{model.__name__} rejects it: {err['msg']}", suggestion)
            )
        return False
    auth = getattr(args, "auth", None)
    if auth is not None and not auth.enabled and _uses_gpus(app):
        findings.append(
            Finding(
                "warning",
                join_path(app_path, "args", "auth"),
                "a production-shaped app (GPU deployments) with auth off: anyone who reaches "
                "the URL can use the GPUs",
                "auth: {enabled: true, keys_file: ...} (or keys_env) with the keys in a secret",
            )
        )
    return True


def _uses_gpus(app: Mapping[str, Any]) -> bool:
    """Whether any deployment of the application asks for a GPU or an accelerator."""
    for d in app.get("deployments") or []:
        options = (d.get("ray_actor_options") or {}) if isinstance(d, Mapping) else {}
        if options.get("num_gpus") or options.get("accelerator_type"):
            return True
    return False


def _field_names_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        _, sub = _models_in(field.annotation)
        if sub is None:
            return []
        model = sub
    return list(getattr(model, "model_fields", {}))
