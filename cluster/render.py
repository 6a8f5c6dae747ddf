"""Serve config + node pools -> KubeRay RayService, and the checked-in ``k8s/`` tree.

- ``serveConfigV2`` is the Serve config itself (parsed and dumped back as YAML);
- the head group runs no replica (``num-cpus: "0"``, ``num-gpus: "0"``): only the Serve
  controller and the HTTP proxy, which need no resources;
- one worker group per pool the config uses (:mod:`cluster.placement`): GPU limits, the
  pool's nodeSelector and tolerations, ``rayStartParams`` advertising the pool's Ray
  resource (``accelerator_type:A100-80G``, ``pool:cpu``), and min/max replicas derived
  from the deployments' replica bounds (so the two cannot drift);
- in-tree autoscaling on, with autoscaler v1: the version the local simulation runs;
- the model-cache PVC on every worker, the Hugging Face token only by ``secretKeyRef``;
- the image: ``rayproject/ray:<rayVersion>-py311-gpu`` with this project installed
  (``k8s/image/Dockerfile``), tagged with the Ray version it was built on;
- ``upgradeStrategy: NewCluster``: a change of the cluster spec brings up a new RayCluster
  and moves traffic when its Serve apps are healthy (zero downtime, at the cost of a second
  cluster's nodes during the switch); a serveConfigV2-only change is applied in place.

The ``k8s/`` tree is a kustomize base (everything that is the same on every cloud: the
RayService without worker groups, the PVC without storage class) and one overlay per cloud
that adds the worker groups and the storage class. ``kubectl kustomize k8s/overlays/X``
equals :func:`render_rayservice` for that cloud (a test checks it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .findings import Finding, errors
from .k8s_models import (
    AutoscalerOptions,
    Container,
    ContainerPort,
    CronJob,
    CronJobSpec,
    EnvVar,
    EnvVarSource,
    HeadGroupSpec,
    JobSpec,
    JobTemplateSpec,
    Kustomization,
    KustomizePatch,
    ObjectMeta,
    PersistentVolumeClaim,
    PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource,
    PodSpec,
    PodTemplateSpec,
    RayClusterSpec,
    RayService,
    RayServiceSpec,
    RayServiceUpgradeStrategy,
    ResourceRequirements,
    SecretKeySelector,
    Toleration,
    Volume,
    VolumeMount,
    VolumeResourceRequirements,
    WorkerGroupSpec,
)
from .lint import lint_config
from .placement import GroupBounds, plan
from .pools import CLOUDS, Cloud
from .serve_config import load_yaml, resolve_deployments

REPO = Path(__file__).resolve().parents[1]
PROD_CONFIG = REPO / "cluster" / "serve-prod.yaml"
K8S_DIR = REPO / "k8s"

NAME = "serve-apps"
RAY_VERSION = "2.60.0"  # = requirements/constraints.txt's ray pin (a test checks both)
PYTHON_TAG = "py311"
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
IMAGE_NAME = "serve-apps"  # set your registry with `kustomize edit set image serve-apps=...`
SERVE_PORT = 8000  # the port KubeRay's serve Service targets

MODEL_CACHE_PVC = "model-cache"
MODEL_CACHE_SIZE = "500Gi"
MODEL_CACHE_MOUNT = "/mnt/model-cache"


def model_cache_env() -> dict[str, str]:
    """Where the caches live on the model-cache volume (KubeRay's PVC, Modal's Volume)."""
    return {
        "HF_HOME": f"{MODEL_CACHE_MOUNT}/huggingface",
        "SERVE_APPS_CACHE_DIR": f"{MODEL_CACHE_MOUNT}/serve_apps",
    }


# The Hugging Face token's secret: the same name on Kubernetes and on Modal.
HF_TOKEN_SECRET = "hf-token"  # kubectl create secret generic hf-token --from-literal=HF_TOKEN=...
HF_TOKEN_KEY = "HF_TOKEN"

# ReadWriteMany storage classes: every worker pod mounts the same model cache.
STORAGE_CLASS: dict[Cloud, str] = {
    "gke": "standard-rwx",  # Filestore CSI driver (enable it on the cluster)
    "eks": "efs-sc",  # EFS CSI driver; create the StorageClass (see k8s/README.md)
}
OVERLAYS: dict[Cloud, str] = {"gke": "gke-a100", "eks": "eks-a100"}

HEAD_CPUS, HEAD_MEMORY = "4", "16Gi"
AUTOSCALER_IDLE_TIMEOUT_S = 300  # a GPU node's cold start is minutes: don't thrash
HEADER = (
    "# Rendered by `python -m cluster render --k8s` from cluster/serve-prod.yaml and\n"
    "# cluster/pools.py. Do not edit: change those and re-render (a test fails on drift).\n"
)


def image() -> str:
    from importlib.metadata import version

    return f"{IMAGE_NAME}:{version('serve-apps')}-ray{RAY_VERSION}-{PYTHON_TAG}-gpu"


class RenderError(ValueError):
    def __init__(self, findings: list[Finding]):
        super().__init__("\n".join(str(f) for f in findings))
        self.findings = findings


@dataclass(frozen=True)
class Rendered:
    rayservice: RayService
    groups: list[GroupBounds]


def preflight(config: Mapping[str, Any], cloud: Cloud | None) -> tuple[list[GroupBounds], list]:
    """Lint the config for a cluster: every lint error, an unpinned CPU replica, and the
    HTTP settings KubeRay needs are errors. Returns (worker groups, findings)."""
    findings = lint_config(config)
    http = config.get("http_options") or {}
    if http.get("host", "127.0.0.1") != "0.0.0.0":
        findings.append(
            Finding(
                "error",
                "http_options.host",
                f"{http.get('host', '127.0.0.1 (the default)')!r}: the proxies must listen "
                "on all interfaces for KubeRay's serve Service to reach them",
                "0.0.0.0",
            )
        )
    if int(http.get("port", SERVE_PORT)) != SERVE_PORT:
        findings.append(
            Finding(
                "error",
                "http_options.port",
                f"KubeRay's serve Service targets port {SERVE_PORT}",
                str(SERVE_PORT),
            )
        )
    if config.get("proxy_location") == "Disabled":
        findings.append(
            Finding("error", "proxy_location", "no HTTP proxy: nothing would serve", "EveryNode")
        )
    if any(
        f.severity == "error" and not f.path.startswith(("http_options", "proxy")) for f in findings
    ):
        return [], findings  # the config itself is broken: placement would only add noise
    deployments = resolve_deployments(config).deployments
    groups: list[GroupBounds] = []
    for c in CLOUDS if cloud is None else (cloud,):
        cloud_groups, placed = plan(deployments, c, unpinned_is_error=True)
        findings += placed
        if c == cloud:
            groups = cloud_groups
    return groups, findings


def load_config(path: Path) -> dict[str, Any]:
    data, findings = load_yaml(path.read_text())
    if errors(findings):
        raise RenderError(findings)
    if not isinstance(data, dict):
        raise RenderError([Finding("error", "", "a Serve config is a mapping")])
    return data


def render_rayservice(config: Mapping[str, Any], cloud: Cloud | None) -> Rendered:
    """The RayService for ``cloud`` (``None``: the cloud-neutral base, no worker groups)."""
    groups, findings = preflight(config, cloud)
    if errors(findings):
        raise RenderError(errors(findings))
    workers = [_worker_group(g) for g in groups] if cloud is not None else None
    rayservice = RayService(
        metadata=ObjectMeta(name=NAME, labels={"app.kubernetes.io/name": NAME}),
        spec=RayServiceSpec(
            upgrade_strategy=RayServiceUpgradeStrategy(type="NewCluster"),
            serve_config_v2=yaml.safe_dump(dict(config), sort_keys=False),
            ray_cluster_config=RayClusterSpec(
                ray_version=RAY_VERSION,
                enable_in_tree_autoscaling=True,
                autoscaler_options=AutoscalerOptions(
                    version="v1",
                    upscaling_mode="Default",
                    idle_timeout_seconds=AUTOSCALER_IDLE_TIMEOUT_S,
                    resources=ResourceRequirements(
                        requests={"cpu": "500m", "memory": "512Mi"},
                        limits={"cpu": "500m", "memory": "512Mi"},
                    ),
                ),
                head_group_spec=_head_group(),
                worker_group_specs=workers,
            ),
        ),
    )
    return Rendered(rayservice, groups)


def _head_group() -> HeadGroupSpec:
    return HeadGroupSpec(
        # No replica on the head: only the Serve controller and proxy (0 CPU each).
        ray_start_params={"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
        template=PodTemplateSpec(
            spec=PodSpec(
                containers=[
                    Container(
                        name="ray-head",
                        image=image(),
                        image_pull_policy="IfNotPresent",
                        ports=[
                            ContainerPort(container_port=6379, name="gcs-server"),
                            ContainerPort(container_port=8265, name="dashboard"),
                            ContainerPort(container_port=10001, name="client"),
                            ContainerPort(container_port=SERVE_PORT, name="serve"),
                        ],
                        resources=ResourceRequirements(
                            requests={"cpu": HEAD_CPUS, "memory": HEAD_MEMORY},
                            limits={"cpu": HEAD_CPUS, "memory": HEAD_MEMORY},
                        ),
                    )
                ]
            )
        ),
    )


def ray_start_resources(resources: Mapping[str, float]) -> str:
    """The ``rayStartParams.resources`` value: JSON in single quotes, as KubeRay pastes it
    into the ``ray start --resources=...`` shell command (and strips the quotes itself
    when it reads the map back)."""
    return "'" + json.dumps(dict(resources), sort_keys=True) + "'"


def _worker_group(group: GroupBounds) -> WorkerGroupSpec:
    pool, shape = group.pool, group.shape
    limits = {"cpu": str(shape.pod_cpus), "memory": f"{shape.pod_memory_gib}Gi"}
    if shape.gpus:
        limits["nvidia.com/gpu"] = str(shape.gpus)
    env = [
        *(EnvVar(name=k, value=v) for k, v in model_cache_env().items()),
        EnvVar(
            name="HF_TOKEN",
            value_from=EnvVarSource(
                secret_key_ref=SecretKeySelector(
                    name=HF_TOKEN_SECRET, key=HF_TOKEN_KEY, optional=True
                )
            ),
        ),
    ]
    return WorkerGroupSpec(
        group_name=pool.name,
        replicas=group.min_nodes,
        min_replicas=group.min_nodes,
        max_replicas=group.max_nodes,
        ray_start_params={
            "num-cpus": str(shape.pod_cpus),
            "num-gpus": str(shape.gpus),
            "resources": ray_start_resources({pool.ray_resource: 1}),
        },
        template=PodTemplateSpec(
            spec=PodSpec(
                containers=[
                    Container(
                        name="ray-worker",
                        image=image(),
                        image_pull_policy="IfNotPresent",
                        ports=[ContainerPort(container_port=SERVE_PORT, name="serve")],
                        env=env,
                        resources=ResourceRequirements(requests=dict(limits), limits=limits),
                        volume_mounts=[
                            VolumeMount(name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_MOUNT)
                        ],
                    )
                ],
                node_selector=dict(shape.node_selector),
                tolerations=[
                    Toleration(key=t.key, operator=t.operator, effect=t.effect, value=t.value)
                    for t in shape.tolerations
                ]
                or None,
                volumes=[
                    Volume(
                        name=MODEL_CACHE_PVC,
                        persistent_volume_claim=PersistentVolumeClaimVolumeSource(
                            claim_name=MODEL_CACHE_PVC
                        ),
                    )
                ],
            )
        ),
    )


def model_cache_pvc(cloud: Cloud | None) -> PersistentVolumeClaim:
    return PersistentVolumeClaim(
        metadata=ObjectMeta(name=MODEL_CACHE_PVC, labels={"app.kubernetes.io/name": NAME}),
        spec=PersistentVolumeClaimSpec(
            access_modes=["ReadWriteMany"],
            resources=VolumeResourceRequirements(requests={"storage": MODEL_CACHE_SIZE}),
            storage_class_name=STORAGE_CLASS[cloud] if cloud else None,
        ),
    )


# --- YAML output ------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


# The scheduled batch: every day at 02:00 (the cluster's time zone), the images put in the
# inbox folder on the model-cache volume become one batch, submitted to the RayService's
# serve Service; the runner deployment does the work, the Job only submits.
BATCH_SCHEDULE = "0 2 * * *"
BATCH_INBOX = f"{MODEL_CACHE_MOUNT}/batch-inbox"
BATCH_SUBMIT = (
    "set -eu; day=$(date +%Y-%m-%d); "
    f"serve-apps batch images {BATCH_INBOX} -o /tmp/input.jsonl "
    "--endpoint /v1/detect --categories text && "
    "serve-apps batch submit /tmp/input.jsonl --endpoint /v1/detect "
    f'--metadata schedule=daily --metadata day="$day" --base-url http://{NAME}-serve-svc:{SERVE_PORT}'
)


def batch_cronjob() -> CronJob:
    """A CronJob that submits the inbox as a batch on a schedule (``BATCH_SCHEDULE``)."""
    return CronJob(
        metadata=ObjectMeta(name=f"{NAME}-batch-daily", labels={"app": NAME}),
        spec=CronJobSpec(
            schedule=BATCH_SCHEDULE,
            concurrency_policy="Forbid",
            starting_deadline_seconds=3600,
            successful_jobs_history_limit=3,
            failed_jobs_history_limit=3,
            job_template=JobTemplateSpec(
                spec=JobSpec(
                    backoff_limit=2,
                    active_deadline_seconds=1800,
                    template=PodTemplateSpec(
                        spec=PodSpec(
                            restart_policy="Never",
                            containers=[
                                Container(
                                    name="submit",
                                    image=image(),
                                    image_pull_policy="IfNotPresent",
                                    command=["sh", "-c", BATCH_SUBMIT],
                                    resources=ResourceRequirements(
                                        requests={"cpu": "250m", "memory": "512Mi"},
                                        limits={"cpu": "1", "memory": "2Gi"},
                                    ),
                                    volume_mounts=[
                                        VolumeMount(
                                            name="model-cache", mount_path=MODEL_CACHE_MOUNT
                                        )
                                    ],
                                )
                            ],
                            volumes=[
                                Volume(
                                    name="model-cache",
                                    persistent_volume_claim=PersistentVolumeClaimVolumeSource(
                                        claim_name=MODEL_CACHE_PVC
                                    ),
                                )
                            ],
                        )
                    ),
                )
            ),
        ),
    )


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(*objects: Mapping[str, Any], header: str = "") -> str:
    return header + yaml.dump_all(
        [dict(o) for o in objects], Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )


# --- the k8s/ tree ----------------------------------------------------------------------


def render_tree(config_path: Path = PROD_CONFIG) -> dict[str, str]:
    """Relative path under ``k8s/`` -> file text, for every rendered file."""
    config = load_config(config_path)
    base = render_rayservice(config, None).rayservice.dump()
    files = {
        "base/kustomization.yaml": to_yaml(
            Kustomization(
                resources=["rayservice.yaml", "model-cache-pvc.yaml", "batch-cronjob.yaml"]
            ).dump(),
            header=HEADER,
        ),
        "base/rayservice.yaml": to_yaml(base, header=HEADER),
        "base/model-cache-pvc.yaml": to_yaml(model_cache_pvc(None).dump(), header=HEADER),
        "base/batch-cronjob.yaml": to_yaml(batch_cronjob().dump(), header=HEADER),
    }
    for cloud, overlay in OVERLAYS.items():
        full = render_rayservice(config, cloud).rayservice.dump()
        workers_patch = {
            "apiVersion": full["apiVersion"],
            "kind": full["kind"],
            "metadata": {"name": full["metadata"]["name"]},
            "spec": {
                "rayClusterConfig": {
                    "workerGroupSpecs": full["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                }
            },
        }
        pvc = model_cache_pvc(cloud).dump()
        storage_patch = {
            "apiVersion": pvc["apiVersion"],
            "kind": pvc["kind"],
            "metadata": {"name": pvc["metadata"]["name"]},
            "spec": {"storageClassName": pvc["spec"]["storageClassName"]},
        }
        files[f"overlays/{overlay}/kustomization.yaml"] = to_yaml(
            Kustomization(
                resources=["../../base"],
                patches=[KustomizePatch(path="workers.yaml"), KustomizePatch(path="storage.yaml")],
            ).dump(),
            header=HEADER,
        )
        files[f"overlays/{overlay}/workers.yaml"] = to_yaml(workers_patch, header=HEADER)
        files[f"overlays/{overlay}/storage.yaml"] = to_yaml(storage_patch, header=HEADER)
    return files


def rendered_dirs() -> list[str]:
    return ["base", *(f"overlays/{o}" for o in OVERLAYS.values())]


def write_tree(files: Mapping[str, str], root: Path = K8S_DIR) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def drift(files: Mapping[str, str], root: Path = K8S_DIR) -> list[str]:
    """What differs between ``files`` and the tree on disk (empty: no drift)."""
    problems = []
    for rel, text in sorted(files.items()):
        path = root / rel
        if not path.exists():
            problems.append(f"k8s/{rel}: missing")
        elif path.read_text() != text:
            problems.append(f"k8s/{rel}: differs from the rendering")
    for d in rendered_dirs():
        for path in sorted((root / d).glob("*")):
            rel = str(path.relative_to(root))
            if rel not in files:
                problems.append(f"k8s/{rel}: not produced by the renderer")
    return problems
