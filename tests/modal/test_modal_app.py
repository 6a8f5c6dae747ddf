"""The Modal app built from the Serve config, offline: nothing here talks to Modal's servers.

Expectations are read from the Serve config and the node-pool table directly, then
compared with what Modal itself recorded for each class.
"""

from __future__ import annotations

import math
import re
import warnings

import modal
import pytest
import yaml
from pydantic import ValidationError

from cluster.pools import pool_for
from cluster.render import MODEL_CACHE_MOUNT
from modal_adapter import plan as planning
from tests.conftest import REPO, load_modal_app

PROD = REPO / "cluster" / "serve-prod.yaml"


@pytest.fixture(scope="module")
def prod_app():
    # Any deprecated Modal form used while building the app fails here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", modal.exception.DeprecationError)
        return load_modal_app(PROD, "prod", "modal_app_prod")


def serve_config_expectations(path):
    """Per Modal class, what the mapping should give, read straight from the YAML: a
    deployment's own settings, then its `args.modal.classes` override, then the packed
    groups (fractions of one GPU type adding up to at most 1) merged."""
    app = yaml.safe_load(path.read_text())["applications"][0]
    overrides = ((app.get("args") or {}).get("modal") or {}).get("classes") or {}
    expected = {}
    fractions: dict[str, list[tuple[str, float]]] = {}
    for d in app["deployments"]:
        options, scaling = d.get("ray_actor_options", {}), d.get("autoscaling_config", {})
        gpus = options.get("num_gpus", 0)
        gpu = (
            pool_for(options["accelerator_type"]).modal_gpu_spec(math.ceil(gpus)) if gpus else None
        )
        o = overrides.get(d["name"], {})
        expected[d["name"]] = {
            "gpus": [] if gpu is None else [gpu] if isinstance(gpu, str) else gpu,
            "containers": (
                o.get("min_containers", scaling["min_replicas"]),
                o.get("max_containers", scaling["max_replicas"]),
            ),
            "inputs": (d["max_ongoing_requests"], scaling["target_ongoing_requests"]),
            "scaledown": o.get("scaledown_window", scaling.get("downscale_delay_s", 600)),
            "cpu": options.get("num_cpus"),
        }
        if 0 < gpus < 1:
            fractions.setdefault(options["accelerator_type"], []).append((d["name"], gpus))
    for members in fractions.values():
        if len(members) < 2 or sum(g for _, g in members) > 1:
            continue
        parts = [expected.pop(name) for name, _ in members]
        expected["".join(name for name, _ in members)] = {
            "gpus": parts[0]["gpus"],
            "containers": tuple(max(p["containers"][i] for p in parts) for i in (0, 1)),
            "inputs": tuple(sum(p["inputs"][i] for p in parts) for i in (0, 1)),
            "scaledown": max(p["scaledown"] for p in parts),
            "cpu": sum(p["cpu"] for p in parts),
        }
    return expected


def registered(modal_cls):
    """What Modal recorded for a class: its public FunctionInfo, and the autoscaler settings.

    min/max containers and the scale-down window are not in FunctionInfo; they are read
    from the class service function's loader closure (private to modal, pinned at 1.6.4).
    """
    from modal._utils.async_utils import synchronizer

    info = modal_cls._get_class_service_function().info()
    service = synchronizer._translate_in(modal_cls)._get_class_service_function()
    cells = dict(
        zip(
            service._load.__code__.co_freevars,
            (c.cell_contents for c in service._load.__closure__),
            strict=True,
        )
    )
    return info, cells["autoscaler_settings"], cells


def test_every_deployment_is_a_class_with_the_options_the_serve_config_says(prod_app):
    expected = serve_config_expectations(PROD)
    assert {c.name for c in prod_app.PLAN.classes} == set(expected)
    for name, want in expected.items():
        info, autoscaler, cells = registered(getattr(prod_app, name))
        assert [g if n == 1 else f"{g}:{n}" for g, n in info.gpus] == want["gpus"], name
        assert (autoscaler.min_containers, autoscaler.max_containers) == want["containers"], name
        assert autoscaler.scaledown_window == want["scaledown"], name
        concurrency = info.concurrency_info
        assert (concurrency.max_inputs, concurrency.target_inputs) == want["inputs"], name
        assert info.timeout == planning.REQUEST_TIMEOUT_S
        assert info.startup_timeout == planning.STARTUP_TIMEOUT_S["gpu" if want["gpus"] else "cpu"]
        assert cells["cpu"] == want["cpu"], name


def test_prod_packs_detector_and_sam_and_scales_the_gpu_classes_to_zero(prod_app):
    by_name = {c.name: c for c in prod_app.PLAN.deployments}
    assert [s.name for s in by_name["DetectorSAM"].servers] == ["Detector", "SAM"]
    assert "Detector" not in by_name and "SAM" not in by_name
    for name in ("LLM", "Codegen", "DetectorSAM"):
        assert by_name[name].min_containers == 0 and by_name[name].scaledown_window == 300
    # The ingress reaches each service through the packed class, by deployment name.
    assert prod_app.SERVICES["detector"][2] == "Detector"
    assert prod_app.SERVICES["sam"][2] == "SAM"
    assert prod_app.SERVICES["sam"][0] is prod_app.SERVICES["detector"][0]


def test_packing_and_overrides_are_settings(tmp_path):
    config = yaml.safe_load(PROD.read_text())
    args = config["applications"][0]["args"]
    args["modal"] = {"pack_fractional_gpus": False, "classes": {"Grounder": {"min_containers": 0}}}
    plan = planning.make_plan(config, "prod", "x", "test")
    names = [c.name for c in plan.deployments]
    assert names == ["LLM", "Codegen", "Detector", "SAM", "Grounder", "BatchRunner"]
    assert plan.deployments[4].min_containers == 0
    assert plan.deployments[0].min_containers == 1  # no override: Serve's min_replicas
    # dev and demo are presets: the overrides are for prod.
    assert planning.make_plan(config, "demo", "x", "test").deployments[4].min_containers == 1
    # Fractions that do not fit one GPU are not packed.
    deployments = config["applications"][0]["deployments"]
    for d in deployments:
        if d["name"] == "SAM":
            d["ray_actor_options"]["num_gpus"] = 0.6
    args["modal"] = {}
    plan = planning.make_plan(config, "prod", "x", "test")
    assert "DetectorSAM" not in [c.name for c in plan.deployments]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"classes": {"SMA": {}}}, "modal.classes: no deployment named \\['SMA'\\]"),
        ({"classes": {"LLM": {"scaledown_window": 1}}}, "greater than or equal to 2"),
        ({"classes": {"LLM": {"min_containers": 5}}}, "min_containers 5 > max 3"),
        ({"classes": {"LLM": {"warm": 1}}}, "warm"),
    ],
)
def test_bad_overrides_are_plan_errors(override, message):
    config = yaml.safe_load(PROD.read_text())
    config["applications"][0]["args"]["modal"] = override
    with pytest.raises(planning.PlanError, match=message):
        planning.make_plan(config, "prod", "x", "test")


def test_model_classes_mount_the_model_cache_and_get_the_token_the_ingress_the_api_keys(
    prod_app,
):
    for plan in prod_app.PLAN.deployments:
        info = getattr(prod_app, plan.name)._get_class_service_function().info()
        assert set(info.volumes) == {MODEL_CACHE_MOUNT}
        assert info.volumes[MODEL_CACHE_MOUNT].name == "serve-apps-model-cache"
        assert (
            info.secrets == []
        )  # they load from the volume: no token (tests/modal/test_modal_deploy.py)
        assert info.method_names == ["call", "stream"]
    ingress = prod_app.Ingress._get_class_service_function().info()
    # auth is on in the production config: the ingress (only) gets the API keys' secret;
    # it mounts the cache for the batch store (batch is on), never the HF token.
    assert prod_app.GRAPH_SERVICES and set(ingress.volumes) == {MODEL_CACHE_MOUNT}
    assert len(ingress.secrets) == 1 and "serve-apps-api-keys" in ingress.secrets[0]
    assert list(ingress.method_details) == ["web"]


def test_a_container_rebuilds_the_same_classes_from_the_baked_plan(prod_app, tmp_path):
    baked = prod_app.PLAN.model_dump_json()
    missing = tmp_path / "not-there.yaml"  # the container has no config file: it must not read one
    container = load_modal_app(missing, "dev", "modal_app_container", plan_json=baked)
    assert container.PLAN == prod_app.PLAN
    for plan in prod_app.PLAN.classes:
        here, there = (
            registered(getattr(prod_app, plan.name)),
            registered(getattr(container, plan.name)),
        )
        assert here[0].gpus == there[0].gpus and here[1] == there[1], plan.name


@pytest.mark.parametrize(("mode", "warm", "window"), [("dev", 0, 60), ("demo", 1, 900)])
def test_modes_change_warm_containers_and_scale_down_windows(mode, warm, window):
    module = load_modal_app(PROD, mode, f"modal_app_{mode}")
    for plan in module.PLAN.deployments:
        _, autoscaler, _ = registered(getattr(module, plan.name))
        assert autoscaler.min_containers == warm and autoscaler.scaledown_window == window
        if mode == "dev":
            assert autoscaler.max_containers == 1


def test_the_choice_of_config_and_mode_is_validated(tmp_path):
    with pytest.raises(ValidationError):
        planning.ModalSettings(mode="staging")
    with pytest.raises(planning.PlanError, match="no Serve config"):
        planning.plan_from_settings(planning.ModalSettings(config=tmp_path / "nope.yaml"))
    typo = yaml.safe_load(PROD.read_text())
    typo["applications"][0]["deployments"][1]["autoscaling_config"]["min_replica"] = 2
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(typo))
    with pytest.raises(planning.PlanError, match="min_replica"):
        planning.plan_from_settings(planning.ModalSettings(config=path))


def test_the_image_installs_the_extras_the_config_needs_under_the_gpu_pins(prod_app):
    image = prod_app.PLAN.image
    assert image.constraints == "requirements/gpu-constraints.txt"
    assert any(p.startswith("vllm") for p in image.pip)  # the text models use backend: vllm
    assert any(p.startswith("segment-anything") for p in image.pip)
    assert not any(p.startswith("ray") for p in image.pip)  # Modal runs no Ray
    assert image.commands == ["python -m spacy download en_core_web_sm"]


# The Modal API forms removed or deprecated by 1.x (they raise or warn in 1.6.4).
DEPRECATED = [
    r"modal\.gpu\.",
    r"\bweb_endpoint\b",
    r"\bFunction\.lookup\b",
    r"\bCls\.lookup\b",
    r"\bcontainer_idle_timeout\b",
    r"\bkeep_warm\b",
    r"\bconcurrency_limit\b",
    r"\ballow_concurrent_inputs\b",
]


def test_the_adapter_uses_no_deprecated_modal_form():
    sources = sorted((REPO / "modal_adapter").glob("*.py"))
    assert {p.name for p in sources} >= {"app.py", "plan.py", "runtime.py"}
    for path in sources:
        code = path.read_text()
        for pattern in DEPRECATED:
            assert not re.search(pattern, code), f"{path.name} uses {pattern}"


def test_the_scheduled_batch_app_runs_daily_over_its_inbox():
    import importlib.util

    import modal

    spec = importlib.util.spec_from_file_location(
        "scheduled_batch", REPO / "modal_adapter" / "scheduled_batch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.SCHEDULE, modal.Cron)
    assert isinstance(module.submit_inbox, modal.Function)
