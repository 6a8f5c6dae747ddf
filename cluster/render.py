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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve_apps.dataplane import SERVE_ENV

from .findings import Finding, errors
from .k8s_models import (
    AutoscalerOptions,
    ConfigMapGenerator,
    Container,
    ContainerPort,
    CronJob,
    CronJobSpec,
    EnvVar,
    EnvVarSource,
    HeadGroupSpec,
    Job,
    JobSpec,
    JobTemplateSpec,
    Kustomization,
    KustomizeComponent,
    KustomizePatch,
    LabelSelector,
    ObjectMeta,
    PersistentVolumeClaim,
    PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource,
    PodMetricsEndpoint,
    PodMonitor,
    PodMonitorSpec,
    PodSpec,
    PodTemplateSpec,
    RayClusterSpec,
    RayService,
    RayServiceSpec,
    RayServiceUpgradeStrategy,
    ResourceRequirements,
    SecretKeySelector,
    SecretVolumeSource,
    Toleration,
    Volume,
    VolumeMount,
    VolumeResourceRequirements,
    WorkerGroupSpec,
)
from .lint import lint_config
from .placement import GroupBounds, marker_resources, plan
from .pools import CLOUDS, RAY_OBJECT_STORE_SHARE, Cloud, NodeShape
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
LOCAL_SCRATCH_GIB = {"gpu": 30, "cpu": 10}  # logs, /tmp, compiled kernels (ephemeral_storage_gib)
PREFETCH_JOB = f"{NAME}-prefetch"
PREFETCH_RETRIES = 6


# What provisions the models on each target (named by a replica whose model is missing).
PREFETCH_COMMAND = {
    "k8s": "the prefetch Job: kubectl delete job serve-apps-prefetch --ignore-not-found && "
    "kubectl apply -k k8s/overlays/<cloud> (see k8s/README.md)",
    "modal": "SERVE_APPS_MODAL_MODE=dev modal run modal_adapter/app.py::prefetch",
}


def model_cache_env() -> dict[str, str]:
    """Where the caches live on the model-cache volume (KubeRay's PVC, Modal's Volume):
    the Hub cache, the prefetch manifests and smoke models, vLLM's compile cache."""
    return {
        "HF_HOME": f"{MODEL_CACHE_MOUNT}/huggingface",
        "SERVE_APPS_CACHE_DIR": f"{MODEL_CACHE_MOUNT}/serve_apps",
        "VLLM_CACHE_ROOT": f"{MODEL_CACHE_MOUNT}/vllm",
    }


def replica_env(target: str) -> dict[str, str]:
    """A model replica's environment on ``target`` (``k8s``, ``modal``): the caches, and
    models loaded only as the prefetch left them (``serve_apps.provision``)."""
    return {
        **model_cache_env(),
        "SERVE_APPS_OFFLINE_MODELS": "1",
        "SERVE_APPS_PREFETCH_COMMAND": PREFETCH_COMMAND[target],
    }


# The Hugging Face token's secret: the same name on Kubernetes and on Modal.
HF_TOKEN_SECRET = "hf-token"  # kubectl create secret generic hf-token --from-literal=HF_TOKEN=...
HF_TOKEN_KEY = "HF_TOKEN"

# The API keys' secret (serve_apps.auth), mounted as a file on every worker, where the
# ingress reads it (auth.keys_file in cluster/serve-prod.yaml); a rotated key reaches the
# running pods without a restart. Optional: pods start without it, and an ingress with
# auth on and no keys fails at start, saying so.
#   kubectl create secret generic serve-apps-api-keys --from-file=keys=./keys.txt
API_KEYS_SECRET = "serve-apps-api-keys"
API_KEYS_VOLUME = "api-keys"
API_KEYS_MOUNT = "/etc/serve-apps/api-keys"
# The scheduled batch submits through the front door like any client, with a key of its
# own (a line `batch-cron=sk-...` in the keys above, its value in this Secret):
#   kubectl create secret generic serve-apps-batch-key --from-literal=OPENAI_API_KEY=sk-...
BATCH_KEY_SECRET = "serve-apps-batch-key"
BATCH_KEY_ENV = "OPENAI_API_KEY"  # what `serve-apps batch` reads its --api-key from

# Ray's metrics endpoint on every pod (KubeRay's default metrics-export-port), which the
# PodMonitor scrapes: Ray's own metrics, Serve's, and ours (serve_apps.metrics).
METRICS_PORT, METRICS_PORT_NAME = 8080, "metrics"
RAY_NODE_LABEL = {"ray.io/is-ray-node": "yes"}  # KubeRay puts it on every Ray pod

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


def _dataplane_env() -> list[EnvVar]:
    """Ray Serve's data plane (serve_apps.dataplane), set on the head and every worker as in
    KubeRay's high-throughput sample: Serve reads it when its processes start."""
    return [EnvVar(name=k, value=v) for k, v in SERVE_ENV.items()]


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
                        # The head runs Serve's controller and HAProxy: the same data plane.
                        env=_dataplane_env(),
                        ports=[
                            ContainerPort(container_port=6379, name="gcs-server"),
                            ContainerPort(container_port=8265, name="dashboard"),
                            ContainerPort(container_port=10001, name="client"),
                            ContainerPort(container_port=SERVE_PORT, name="serve"),
                            ContainerPort(container_port=METRICS_PORT, name=METRICS_PORT_NAME),
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
    # Local disk is asked for, not capped (no limit: a pod past it is not evicted).
    requests = {**limits, "ephemeral-storage": f"{ephemeral_storage_gib(shape)}Gi"}
    env = [
        *_dataplane_env(),
        *(EnvVar(name=k, value=v) for k, v in replica_env("k8s").items()),
        _hf_token(),
    ]
    return WorkerGroupSpec(
        group_name=pool.name,
        replicas=group.min_nodes,
        min_replicas=group.min_nodes,
        max_replicas=group.max_nodes,
        ray_start_params={
            "num-cpus": str(shape.pod_cpus),
            "num-gpus": str(shape.gpus),
            "resources": ray_start_resources(
                {k: int(v) for k, v in marker_resources(pool, shape).items()}
            ),
        },
        template=PodTemplateSpec(
            spec=PodSpec(
                containers=[
                    Container(
                        name="ray-worker",
                        image=image(),
                        image_pull_policy="IfNotPresent",
                        ports=[
                            ContainerPort(container_port=SERVE_PORT, name="serve"),
                            ContainerPort(container_port=METRICS_PORT, name=METRICS_PORT_NAME),
                        ],
                        env=env,
                        resources=ResourceRequirements(requests=requests, limits=limits),
                        volume_mounts=[
                            VolumeMount(name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_MOUNT),
                            VolumeMount(
                                name=API_KEYS_VOLUME, mount_path=API_KEYS_MOUNT, read_only=True
                            ),
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
                    _model_cache_volume(),
                    Volume(
                        name=API_KEYS_VOLUME,
                        secret=SecretVolumeSource(secret_name=API_KEYS_SECRET, optional=True),
                    ),
                ],
            )
        ),
    )


def ephemeral_storage_gib(shape: NodeShape) -> int:
    """A worker pod's local disk. The weights are not on it: they are on the model-cache
    PVC, with vLLM's compile cache, and safetensors are memory-mapped from there (nothing
    is staged locally). What is local: Ray's object spilling (up to the object store, a
    share of the pod's memory), and Ray's logs, /tmp and the kernels torch/Triton
    compile (:data:`LOCAL_SCRATCH_GIB`)."""
    spill = math.ceil(shape.pod_memory_gib * RAY_OBJECT_STORE_SHARE)
    return spill + LOCAL_SCRATCH_GIB["gpu" if shape.gpus else "cpu"]


def _hf_token() -> EnvVar:
    """HF_TOKEN from the ``hf-token`` secret when there is one (optional: public models)."""
    return EnvVar(
        name="HF_TOKEN",
        value_from=EnvVarSource(
            secret_key_ref=SecretKeySelector(name=HF_TOKEN_SECRET, key=HF_TOKEN_KEY, optional=True)
        ),
    )


def _model_cache_volume() -> Volume:
    return Volume(
        name=MODEL_CACHE_PVC,
        persistent_volume_claim=PersistentVolumeClaimVolumeSource(claim_name=MODEL_CACHE_PVC),
    )


def prefetch_job(config: Mapping[str, Any]) -> Job:
    """The Job that provisions every model the config names onto the model-cache PVC
    (``python -m serve_apps.provision``; retried, and each retry resumes)."""
    args = ((config.get("applications") or [{}])[0]).get("args") or {}
    cpu, memory = "4", "16Gi"
    resources = {"cpu": cpu, "memory": memory, "ephemeral-storage": "10Gi"}
    return Job(
        metadata=ObjectMeta(name=PREFETCH_JOB, labels={"app.kubernetes.io/name": NAME}),
        spec=JobSpec(
            backoff_limit=PREFETCH_RETRIES,
            template=PodTemplateSpec(
                spec=PodSpec(
                    restart_policy="Never",
                    containers=[
                        Container(
                            name="prefetch",
                            image=image(),
                            image_pull_policy="IfNotPresent",
                            command=[
                                "python",
                                "-m",
                                "serve_apps.provision",
                                "--args-json",
                                json.dumps(args, sort_keys=True),
                            ],
                            env=[
                                *(EnvVar(name=k, value=v) for k, v in model_cache_env().items()),
                                _hf_token(),
                            ],
                            resources=ResourceRequirements(
                                requests=dict(resources), limits=resources
                            ),
                            volume_mounts=[
                                VolumeMount(name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_MOUNT)
                            ],
                        )
                    ],
                    volumes=[_model_cache_volume()],
                )
            ),
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


# --- optional components ---------------------------------------------------------------

# GCS fault tolerance (KubeRay's high-availability sample): the head's GCS keeps its state
# in an external Redis, so a head restart does not restart the GPU workers.
REDIS_NAME = f"{NAME}-redis"
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7.4.0"
# kubectl create secret generic serve-apps-redis --from-literal=password="$(openssl rand -hex 24)"
REDIS_SECRET, REDIS_SECRET_KEY = REDIS_NAME, "password"
# Incremental upgrades: a new cluster grows step by step while traffic moves to it, at
# most maxSurgePercent more capacity at a time (instead of a whole second cluster).
INCREMENTAL_UPGRADE = {
    "gatewayClassName": "istio",
    "stepSizePercent": 25,
    "intervalSeconds": 60,
    "maxSurgePercent": 25,
}
COMPONENTS = ("gcs-ft", "incremental-upgrade")


def _rayservice_patch(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME},
        "spec": spec,
    }


def gcs_ft_objects() -> list[dict[str, Any]]:
    """The Redis the GCS stores its state in: a Service and a one-replica Deployment with
    an append-only file, its password from the ``serve-apps-redis`` secret."""
    labels = {"app.kubernetes.io/name": REDIS_NAME}
    password = {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY}}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": REDIS_PORT}],
        },
    }
    container = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "command": ["redis-server"],
        "args": [
            "--appendonly",
            "yes",
            "--dir",
            "/data",
            "--port",
            str(REDIS_PORT),
            "--requirepass",
            "$(REDIS_PASSWORD)",
        ],
        "env": [{"name": "REDIS_PASSWORD", "valueFrom": password}],
        "ports": [{"containerPort": REDIS_PORT, "name": "redis"}],
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "2Gi"},
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]},
            },
        },
    }
    return [service, deployment]


def gcs_ft_patch() -> dict[str, Any]:
    return _rayservice_patch(
        {
            "rayClusterConfig": {
                "gcsFaultToleranceOptions": {
                    "redisAddress": f"{REDIS_NAME}:{REDIS_PORT}",
                    "redisPassword": {
                        "valueFrom": {
                            "secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY}
                        }
                    },
                }
            }
        }
    )


def incremental_upgrade_patch() -> dict[str, Any]:
    return _rayservice_patch(
        {
            "upgradeStrategy": {
                "type": "NewClusterWithIncrementalUpgrade",
                "clusterUpgradeOptions": dict(INCREMENTAL_UPGRADE),
            }
        }
    )


def component_files() -> dict[str, str]:
    """``components/<name>/...``: what an overlay adds with ``components:``."""
    return {
        "components/gcs-ft/kustomization.yaml": to_yaml(
            KustomizeComponent(
                resources=["redis.yaml"], patches=[KustomizePatch(path="rayservice.yaml")]
            ).dump(),
            header=HEADER,
        ),
        "components/gcs-ft/redis.yaml": to_yaml(*gcs_ft_objects(), header=HEADER),
        "components/gcs-ft/rayservice.yaml": to_yaml(gcs_ft_patch(), header=HEADER),
        "components/incremental-upgrade/kustomization.yaml": to_yaml(
            KustomizeComponent(patches=[KustomizePatch(path="rayservice.yaml")]).dump(),
            header=HEADER,
        ),
        "components/incremental-upgrade/rayservice.yaml": to_yaml(
            incremental_upgrade_patch(), header=HEADER
        ),
    }


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
                                    env=[
                                        EnvVar(
                                            name=BATCH_KEY_ENV,
                                            value_from=EnvVarSource(
                                                secret_key_ref=SecretKeySelector(
                                                    name=BATCH_KEY_SECRET,
                                                    key=BATCH_KEY_ENV,
                                                    optional=True,
                                                )
                                            ),
                                        )
                                    ],
                                    resources=ResourceRequirements(
                                        requests={"cpu": "250m", "memory": "512Mi"},
                                        limits={"cpu": "1", "memory": "2Gi"},
                                    ),
                                    volume_mounts=[
                                        VolumeMount(
                                            name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_MOUNT
                                        )
                                    ],
                                )
                            ],
                            volumes=[_model_cache_volume()],
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
                resources=[
                    "rayservice.yaml",
                    "model-cache-pvc.yaml",
                    "prefetch-job.yaml",
                    "batch-cronjob.yaml",
                ]
            ).dump(),
            header=HEADER,
        ),
        "base/prefetch-job.yaml": to_yaml(prefetch_job(config).dump(), header=HEADER),
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
    files.update(component_files())
    files.update(monitoring_files())
    return files


def pod_monitor() -> PodMonitor:
    """Prometheus Operator's scrape of Ray's metrics endpoint on every Ray pod."""
    return PodMonitor(
        metadata=ObjectMeta(name=NAME, labels={"app.kubernetes.io/name": NAME}),
        spec=PodMonitorSpec(
            job_label="ray.io/cluster",
            selector=LabelSelector(match_labels=RAY_NODE_LABEL),
            pod_metrics_endpoints=[
                PodMetricsEndpoint(port=METRICS_PORT_NAME, path="/metrics", interval="15s")
            ],
        ),
    )


DASHBOARD_FILE = "grafana-dashboard.json"


def monitoring_files() -> dict[str, str]:
    """``k8s/monitoring/``: the PodMonitor, and the Grafana dashboard as a ConfigMap that
    Grafana's dashboard sidecar loads (label ``grafana_dashboard: "1"``)."""
    from .dashboard import dashboard

    return {
        "monitoring/kustomization.yaml": to_yaml(
            Kustomization(
                resources=["podmonitor.yaml"],
                config_map_generator=[
                    ConfigMapGenerator(
                        name=f"{NAME}-dashboard",
                        files=[DASHBOARD_FILE],
                        options={
                            "labels": {"grafana_dashboard": "1"},
                            "disableNameSuffixHash": True,
                        },
                    )
                ],
            ).dump(),
            header=HEADER,
        ),
        "monitoring/podmonitor.yaml": to_yaml(pod_monitor().dump(), header=HEADER),
        f"monitoring/{DASHBOARD_FILE}": json.dumps(dashboard(), indent=2) + "\n",
    }


def rendered_dirs() -> list[str]:
    return [
        "base",
        *(f"overlays/{o}" for o in OVERLAYS.values()),
        *(f"components/{c}" for c in COMPONENTS),
        "monitoring",
    ]


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
