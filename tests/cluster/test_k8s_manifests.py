"""The checked-in k8s/ tree: no drift, valid against the real schemas, overlays build."""

from __future__ import annotations

import json
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
    prefetch_job,
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
    (job,) = _docs(K8S_DIR / "base/prefetch-job.yaml")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
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
    assert set(docs) == {"RayService", "PersistentVolumeClaim", "Job", "CronJob"}
    assert docs["CronJob"] == batch_cronjob().dump()
    rs, pvc = docs["RayService"], docs["PersistentVolumeClaim"]
    kubernetes_validate.validate(docs["Job"], K8S_VERSION, strict=True)
    assert docs["Job"] == prefetch_job(prod_config).dump()
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


def test_the_prefetch_job_fetches_what_the_config_names_onto_the_workers_volume(prod_config):
    import json

    from serve_apps import provision
    from serve_apps.registry import AppArgs

    job = prefetch_job(prod_config).dump()
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:4] == ["python", "-m", "serve_apps.provision", "--args-json"]
    args = AppArgs.model_validate(json.loads(container["command"][4]))
    prod_args = AppArgs.model_validate(prod_config["applications"][0]["args"])
    assert provision.assets(args) == provision.assets(prod_args) != []
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "SERVE_APPS_OFFLINE_MODELS" not in env  # it is the one that downloads
    rs = render_rayservice(prod_config, "gke").rayservice.dump()
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        wenv = {e["name"]: e.get("value") for e in worker["env"]}
        assert wenv["SERVE_APPS_OFFLINE_MODELS"] == "1"
        for name in ("HF_HOME", "SERVE_APPS_CACHE_DIR", "VLLM_CACHE_ROOT"):
            assert wenv[name] == env[name]["value"]
        # The same model cache (workers also mount the API keys' Secret).
        cache = {m["name"] for m in container["volumeMounts"]}
        mounts = worker["volumeMounts"]
        assert [m for m in mounts if m["name"] in cache] == container["volumeMounts"]
        volumes = group["template"]["spec"]["volumes"]
        assert [v for v in volumes if v["name"] in cache] == pod["volumes"]


@pytest.mark.parametrize("cloud", list(OVERLAYS))
def test_the_optional_components_build_onto_each_overlay_and_validate(
    cloud, kubectl, rayservice_schema, tmp_path
):
    import os

    from cluster.render import COMPONENTS, INCREMENTAL_UPGRADE, REDIS_NAME

    # A user's overlay: the cloud overlay plus both components (k8s/README.md).
    mine = tmp_path / "my-overlay"
    mine.mkdir()
    rel = lambda p: os.path.relpath(p, mine)  # noqa: E731 - kustomize takes relative paths
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [rel(K8S_DIR / "overlays" / OVERLAYS[cloud])],
                "components": [rel(K8S_DIR / "components" / c) for c in COMPONENTS],
            }
        )
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(mine)], capture_output=True, text=True, check=True
    )
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    rs = docs[("RayService", "serve-apps")]
    assert validate(rs, rayservice_schema) == []
    assert kuberay_checks(rs) == []
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"{REDIS_NAME}:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == REDIS_NAME
    assert rs["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": INCREMENTAL_UPGRADE,
    }
    # The patches add, they do not replace: the workers are the overlay's.
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for kind in ("Service", "Deployment"):
        kubernetes_validate.validate(docs[(kind, REDIS_NAME)], K8S_VERSION, strict=True)
    # The password comes from the user's secret, never from the repository.
    (redis,) = docs[("Deployment", REDIS_NAME)]["spec"]["template"]["spec"]["containers"]
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert redis["env"][0]["valueFrom"]["secretKeyRef"]["name"] == REDIS_NAME


def test_incremental_upgrade_options_are_checked_as_kuberay_does(prod_config):
    from cluster.render import incremental_upgrade_patch

    rs = render_rayservice(prod_config, "gke").rayservice.dump()
    rs["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade"}
    assert kuberay_checks(rs) == ["NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions"]
    rs["spec"]["upgradeStrategy"] = incremental_upgrade_patch()["spec"]["upgradeStrategy"]
    assert kuberay_checks(rs) == []
    rs["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["maxSurgePercent"] = 150
    del rs["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"]
    problems = kuberay_checks(rs)
    assert any("maxSurgePercent 150" in p for p in problems)
    assert any("gatewayClassName" in p for p in problems)


def test_workers_ask_for_local_disk_without_a_cap(prod_config):
    from cluster.render import ephemeral_storage_gib

    for cloud in OVERLAYS:
        rs = render_rayservice(prod_config, cloud).rayservice.dump()
        for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            assert resources["requests"]["ephemeral-storage"].endswith("Gi")
            assert "ephemeral-storage" not in resources["limits"]
    from cluster.pools import A100_40GB, CPU

    gpu, cpu = A100_40GB.shape("gke"), CPU.shape("gke")
    assert ephemeral_storage_gib(gpu) > ephemeral_storage_gib(cpu)


def test_the_api_keys_secret_is_referenced_never_inlined(rayservice_schema, prod_config):
    from cluster.render import API_KEYS_MOUNT, API_KEYS_SECRET

    rs = render_rayservice(prod_config, "gke").rayservice.dump()
    assert validate(rs, rayservice_schema) == []
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    auth = config["applications"][0]["args"]["auth"]
    assert auth["enabled"] is True and auth["keys_file"].startswith(API_KEYS_MOUNT + "/")
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"] == {"secretName": API_KEYS_SECRET, "optional": True}
        (container,) = pod["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts[volume["name"]] == {
            "name": volume["name"],
            "mountPath": API_KEYS_MOUNT,
            "readOnly": True,
        }
        # The metrics port the PodMonitor scrapes.
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
        # One secret object as a pod would get it validates as Kubernetes' core schema.
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod},
            K8S_VERSION,
            strict=True,
        )


def test_the_pod_monitor_and_dashboard_match_the_pods_and_the_metrics():
    from cluster.render import METRICS_PORT_NAME, RAY_NODE_LABEL
    from serve_apps.metrics import METRICS

    (pm,) = _docs(K8S_DIR / "monitoring/podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert pm["spec"]["selector"] == {"matchLabels": RAY_NODE_LABEL}
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == [METRICS_PORT_NAME]
    dashboard = json.loads((K8S_DIR / "monitoring/grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for m in METRICS:
        assert f"ray_{m.name}" in exprs
    (kustomization,) = _docs(K8S_DIR / "monitoring/kustomization.yaml")
    assert kustomization["resources"] == ["podmonitor.yaml"]
