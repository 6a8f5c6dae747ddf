"""The checked-in k8s/ tree: no drift, valid against the real schemas, overlays build."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from cluster.crd import kuberay_checks, validate
from cluster.render import (
    K8S_DIR,
    OVERLAYS,
    batch_cronjob,
    drift,
    model_cache_pvc,
    render_rayservice,
    render_tree,
)
from tests.conftest import REPO

K8S_VERSION = "1.32"  # the Kubernetes schemas kubernetes-validate checks core objects with


def test_the_checked_in_tree_is_what_the_renderer_writes():
    problems = drift(render_tree())
    assert problems == [], "k8s/ drifted; run `python -m cluster render --k8s`:\n" + "\n".join(
        problems
    )


def test_the_drift_check_sees_an_edit(tmp_path):
    files = render_tree()
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert drift(files, tmp_path) == []
    edited = tmp_path / "overlays" / OVERLAYS["gke"] / "workers.yaml"
    edited.write_text(edited.read_text().replace("maxReplicas: 5", "maxReplicas: 9"))
    (tmp_path / "base" / "extra.yaml").write_text("{}")
    assert drift(files, tmp_path) == [
        f"k8s/overlays/{OVERLAYS['gke']}/workers.yaml: differs from the rendering",
        "k8s/base/extra.yaml: not produced by the renderer",
    ]


def test_cli_check_passes():
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "render", "--k8s", "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_base_validates(rayservice_schema):
    (rs,) = _docs(K8S_DIR / "base/rayservice.yaml")
    assert validate(rs, rayservice_schema) == []
    assert kuberay_checks(rs) == []
    (pvc,) = _docs(K8S_DIR / "base/model-cache-pvc.yaml")
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    (cron,) = _docs(K8S_DIR / "base/batch-cronjob.yaml")
    kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_the_batch_cronjob_submits_the_inbox_to_the_serve_service():
    cron = batch_cronjob().dump()
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    assert "serve-apps batch images /mnt/model-cache/batch-inbox" in script
    assert "serve-apps batch submit" in script and "http://serve-apps-serve-svc:8000" in script
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "model-cache"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    broken = {**cron, "spec": {**cron["spec"], "jobTemplate": {"spec": {"backofLimit": 1}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("cloud", list(OVERLAYS))
def test_each_overlay_builds_validates_and_equals_the_direct_rendering(
    cloud, kubectl, rayservice_schema, prod_config
):
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR / "overlays" / OVERLAYS[cloud])],
        capture_output=True,
        text=True,
        check=True,
    )
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert set(docs) == {"RayService", "PersistentVolumeClaim", "CronJob"}
    assert docs["CronJob"] == batch_cronjob().dump()
    rs, pvc = docs["RayService"], docs["PersistentVolumeClaim"]
    assert validate(rs, rayservice_schema) == []
    assert kuberay_checks(rs) == []
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    assert rs == render_rayservice(prod_config, cloud).rayservice.dump()
    assert pvc == model_cache_pvc(cloud).dump()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_validators_are_strict(rayservice_schema, prod_config):
    rs = render_rayservice(prod_config, "gke").rayservice.dump()
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicy"
    ] = 3
    rs["spec"]["managedBy"] = "ray.io/kuberay-operator"
    problems = validate(rs, rayservice_schema)
    assert any("'minReplica' was unexpected" in p for p in problems)
    assert any("imagePullPolicy: 3 is not of type 'string'" in p for p in problems)
    assert any("CEL rules not evaluated" in p for p in problems)
    rs["spec"]["upgradeStrategy"]["type"] = "Rolling"
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 9
    checks = kuberay_checks(rs)
    assert any("Rolling" in c for c in checks) and any("minReplicas 9 >" in c for c in checks)
    pvc = model_cache_pvc("gke").dump()
    pvc["spec"]["acessModes"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)


def test_the_k8s_readme_names_every_overlay():
    text = (REPO / "k8s/README.md").read_text()
    for overlay in OVERLAYS.values():
        assert f"k8s/overlays/{overlay}" in text
