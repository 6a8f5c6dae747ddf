"""The strict Serve-config linter: Ray drops unknown keys silently, we do not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cluster.findings import errors
from cluster.lint import _walk, lint_file, lint_text
from tests.conftest import REPO

APP = "serve_apps.ray_app:build_app"


def config(deployments: str, args: str = "{}", extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        {extra}
        applications:
          - name: app
            import_path: {APP}
            args: {args}
            deployments:
        """
    ) + textwrap.indent(textwrap.dedent(deployments), "      ")


PINNED = """\
- name: Ingress
  ray_actor_options: {num_cpus: 1, resources: {"pool:cpu": 0.001}}
- name: Codegen
  ray_actor_options: {num_gpus: 1, accelerator_type: A100-80G}
"""


def only(findings, severity="error"):
    return [f for f in findings if f.severity == severity]


@pytest.mark.parametrize("path", ["config.yaml", "cluster/serve-prod.yaml"])
def test_the_projects_configs_have_no_errors(path):
    assert errors(lint_file(REPO / path)) == []


def test_the_production_config_has_no_warnings_either():
    assert lint_file(REPO / "cluster/serve-prod.yaml") == []


@pytest.mark.parametrize(
    ("entry", "path", "suggestion"),
    [
        ("autoscaling_config: {min_replica: 1}", "autoscaling_config.min_replica", "min_replicas"),
        ("ray_actor_options: {num_gpu: 1}", "ray_actor_options.num_gpu", "num_gpus"),
        ("max_concurrent_queries: 8", "max_concurrent_queries", "max_ongoing_requests"),
        (
            "autoscaling_config: {target_num_ongoing_requests_per_replica: 2}",
            "autoscaling_config.target_num_ongoing_requests_per_replica",
            "target_ongoing_requests",
        ),
        ("num_gpus: 1", "num_gpus", "ray_actor_options.num_gpus"),
    ],
)
def test_unknown_keys_are_errors_with_path_and_suggestion(entry, path, suggestion):
    text = config(f"- name: LLM\n  {entry}\n" + PINNED)
    found = [f for f in only(lint_text(text)) if f.path.endswith(path)]
    assert len(found) == 1, lint_text(text)
    assert found[0].path == f"applications[0].deployments[0].{path}"
    assert found[0].suggestion == suggestion
    assert "drops it silently" in found[0].reason


def test_unknown_top_level_and_http_keys():
    text = "import_path: x:y\nhttp_options: {hots: 0.0.0.0}\napplications: []\n"
    paths = {f.path: f.suggestion for f in only(lint_text(text))}
    assert paths["import_path"] == "applications: [{import_path: ...}]"
    assert paths["http_options.hots"] == "host"


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("DeploymentSchema", "deployment"),
        ("AutoscalingConfig", "autoscaling"),
        ("RayActorOptionsSchema", "actor"),
        ("ServeApplicationSchema", "app"),
        ("ServeDeploySchema", "root"),
    ],
)
def test_allowed_keys_are_rays_own_fields(model, path):
    import ray.serve.config
    import ray.serve.schema

    cls = getattr(ray.serve.schema, model, None) or getattr(ray.serve.config, model)
    findings = []
    _walk({name: None for name in cls.model_fields}, cls, path, findings)
    assert only(findings) == []
    findings = []
    _walk({"not_a_ray_field": 1}, cls, path, findings)
    assert [f.path for f in findings] == [f"{path}.not_a_ray_field"]


def test_deprecated_fields_warn_and_metrics_interval_says_why():
    text = config("- name: LLM\n  autoscaling_config: {metrics_interval_s: 1}\n" + PINNED)
    warnings = [f for f in only(lint_text(text), "warning") if "metrics_interval_s" in f.path]
    assert warnings and "only setting" in warnings[0].reason
    assert not [f for f in only(lint_text(text)) if "metrics_interval_s" in f.path]


def test_duplicate_yaml_keys_are_errors():
    text = config("- name: LLM\n  max_ongoing_requests: 4\n  max_ongoing_requests: 8\n" + PINNED)
    dup = [f for f in only(lint_text(text)) if "duplicate key" in f.reason]
    assert dup and dup[0].path.startswith("line ")


def test_args_are_validated_against_app_args():
    text = config(PINNED, args="{llm: {served_model_name: a, max_batch_sise: 4}}")
    found = only(lint_text(text))
    assert [(f.path, f.suggestion) for f in found] == [
        ("applications[0].args.llm.max_batch_sise", "max_batch_size")
    ]


def test_rays_own_validation_runs_too():
    text = config("- name: LLM\n  num_replicas: many\n" + PINNED)
    assert any("Ray Serve rejects it" in f.reason for f in only(lint_text(text)))


def test_a_deployment_the_app_does_not_build_is_an_error_with_a_suggestion():
    found = only(lint_text(config("- name: LLMs\n  num_replicas: 1\n" + PINNED)))
    assert [(f.path, f.suggestion) for f in found] == [
        ("applications[0].deployments[0].name", "LLM")
    ]


@pytest.mark.parametrize(
    ("accelerator", "suggestion"), [("A100-80GB", "A100-80G"), ("H100", None), ("A100", "A100-80G")]
)
def test_an_accelerator_no_pool_provides_is_an_error(accelerator, suggestion):
    entry = f"- name: LLM\n  ray_actor_options: {{num_gpus: 1, accelerator_type: {accelerator}}}\n"
    found = only(lint_text(config(entry + PINNED)))
    assert len(found) == 1 and found[0].path.endswith("ray_actor_options.accelerator_type")
    assert found[0].suggestion == suggestion


def test_bounds_no_pool_can_hold_are_errors():
    big = "- name: LLM\n  ray_actor_options: {num_gpus: 2, accelerator_type: A100-80G}\n"
    found = only(lint_text(config(big + PINNED)))
    assert any("no node of the pool can hold it" in f.reason and "gke" in f.reason for f in found)
    many = (
        "- name: LLM\n  autoscaling_config: {min_replicas: 1, max_replicas: 40}\n"
        "  ray_actor_options: {num_gpus: 1, accelerator_type: A100-80G}\n"
    )
    found = only(lint_text(config(many + PINNED)))
    assert {("gke" in f.reason, "eks" in f.reason) for f in found} == {(True, False), (False, True)}


def test_deployments_are_whatever_the_builder_binds():
    text = textwrap.dedent(
        """\
        applications:
          - name: vision
            import_path: tests.cluster.sample_app:build
            args: {services: [Detector, SAM]}
            deployments:
              - name: SAM
                ray_actor_options: {num_gpus: 1, accelerator_type: A100-40G}
              - name: Detectr
                ray_actor_options: {num_gpus: 1, accelerator_type: A100-80G}
        """
    )
    found = lint_text(text)
    assert [(f.path, f.suggestion) for f in only(found)] == [
        ("applications[0].deployments[1].name", "Detector")
    ]
    no_entry = [f.reason for f in only(found, "warning") if "has no entry" in f.reason]
    assert len(no_entry) == 2  # Detector and Front run with the code's defaults


def test_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(config("- name: LLM\n  num_replica: 2\n" + PINNED))
    run = [sys.executable, "-m", "cluster", "lint"]
    good = subprocess.run([*run, str(REPO / "cluster/serve-prod.yaml")], capture_output=True)
    assert good.returncode == 0, good.stdout
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "num_replica" in out.stdout and "suggestion: num_replicas" in out.stdout


def test_gpu_deployments_with_auth_off_warn_and_auth_on_does_not():
    off = only(lint_text(config(PINNED)), "warning")
    assert [f.path for f in off if "auth" in f.path] == ["applications[0].args.auth"]
    assert "GPUs" in next(f.reason for f in off if "auth" in f.path)
    on = lint_text(config(PINNED, args="{auth: {enabled: true}}"))
    assert not [f for f in on if "auth" in f.path]
    cpu_only = config("- name: Ingress\n  ray_actor_options: {num_cpus: 1}\n")
    assert not [f for f in lint_text(cpu_only) if "auth" in f.path]
