"""Validate rendered objects against the real KubeRay CRD schema, strictly, plus the
checks KubeRay's controller makes that the schema cannot express.

The CRD (``openAPIV3Schema``) is read at run time from a directory of KubeRay CRD files
(the project's tests use ``../shared/reference/kuberay-crds``, the v1.7.0 CRDs): nothing
is copied into the repository. Strict means what ``kubectl apply`` does with server-side
field validation ``Strict`` (its default): a field the schema does not declare is an
error, not silently pruned. ``x-kubernetes-validations`` (CEL) rules are not evaluated
here, so setting a field that carries one is reported instead of passing unchecked.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# KubeRay v1.7.0, ray-operator/controllers/ray/utils/constant.go:
# MaxRayClusterNameLength = 53, MaxRayServiceNameLength = MaxRayClusterNameLength - 6.
MAX_RAYSERVICE_NAME = 47
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load_crd_schema(path: Path, version: str = "v1") -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of one served version of a CRD file."""
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strictify(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{path}: no version {version!r}")


def strictify(schema: Any) -> Any:
    """A copy where every object with declared properties rejects undeclared ones."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def _cel_not_evaluated(validator: Any, rules: Any, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema import ValidationError

    yield ValidationError(
        f"this field carries CEL rules not evaluated offline: {[r['rule'] for r in rules]}"
    )


def validate(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Schema violations of ``obj`` (empty: valid), each with its JSON path."""
    from jsonschema import Draft7Validator, validators

    cls = validators.extend(Draft7Validator, {"x-kubernetes-validations": _cel_not_evaluated})
    return [
        f"{e.json_path}: {e.message}"
        for e in sorted(cls(schema).iter_errors(obj), key=lambda e: list(e.path))
    ]


def _resources_map(value: str) -> dict[str, float]:
    """KubeRay's getResourcesMap: trim quotes/backticks/spaces, then JSON."""
    return {k: float(v) for k, v in json.loads(value.strip("'\"` ")).items()}


def _upgrade_option_checks(options: Mapping[str, Any]) -> list[str]:
    """KubeRay v1.7.0's ValidateClusterUpgradeOptions: percentages in 0..100, a positive
    interval and step, and a Gateway class to route the traffic split with."""
    problems = []
    for key in ("maxSurgePercent", "stepSizePercent"):
        value = options.get(key, 100 if key == "maxSurgePercent" else None)
        if value is None or not 0 <= value <= 100:
            problems.append(f"clusterUpgradeOptions.{key} {value!r} not in 0..100")
    if options.get("stepSizePercent") == 0:
        problems.append("clusterUpgradeOptions.stepSizePercent must be > 0")
    if not options.get("intervalSeconds") or options["intervalSeconds"] <= 0:
        problems.append("clusterUpgradeOptions.intervalSeconds must be > 0")
    if not options.get("gatewayClassName"):
        problems.append("clusterUpgradeOptions.gatewayClassName is required")
    return problems


def kuberay_checks(rayservice: Mapping[str, Any]) -> list[str]:
    """Checks from KubeRay v1.7.0's validation.go (ValidateRayServiceMetadata/Spec,
    ValidateRayClusterSpec) that the CRD schema does not express."""
    problems = []
    name = rayservice.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYSERVICE_NAME or not _DNS1035.match(name):
        problems.append(f"metadata.name {name!r}: DNS-1035 label of <= {MAX_RAYSERVICE_NAME}")
    spec = rayservice.get("spec", {})
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in UPGRADE_TYPES:
        problems.append(f"spec.upgradeStrategy.type {kind!r} not in {UPGRADE_TYPES}")
    if kind == "NewClusterWithIncrementalUpgrade":
        options = (spec.get("upgradeStrategy") or {}).get("clusterUpgradeOptions")
        if not options:
            problems.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
        else:
            problems += _upgrade_option_checks(options)
    if not spec.get("serveConfigV2"):
        problems.append("spec.serveConfigV2 is empty")
    cluster = spec.get("rayClusterConfig", {})
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    idle = (cluster.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []]
    for group_name, group in groups:
        params = group.get("rayStartParams") or {}
        if not group.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"group {group_name}: no container")
        if "labels" in params:
            problems.append(f"group {group_name}: rayStartParams['labels'] is not supported")
        uses_params = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        if uses_params and group.get("resources"):
            problems.append(f"group {group_name}: resources in both rayStartParams and Resources")
        if params.get("resources"):
            try:
                _resources_map(params["resources"])
            except (ValueError, AttributeError) as e:
                problems.append(f"group {group_name}: rayStartParams.resources is not JSON: {e}")
        if group_name == "head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"group {group_name}: min/maxReplicas needed without autoscaling")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            problems.append(f"group {group_name}: negative min/maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"group {group_name}: minReplicas {lo} > maxReplicas {hi}")
    return problems
