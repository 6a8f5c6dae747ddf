"""Typed models of the Kubernetes objects the renderer writes (only the fields it sets).

Field names are the API's (camelCase aliases); unknown fields are rejected, so a typo in
the renderer fails here, and the tests validate the dumped objects against the real
schemas (the KubeRay v1.7.0 CRD, Kubernetes' core schemas).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class K8sModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(K8sModel):
    name: str
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


# --- core/v1 ----------------------------------------------------------------------------


class SecretKeySelector(K8sModel):
    name: str
    key: str
    optional: bool | None = None


class EnvVarSource(K8sModel):
    secret_key_ref: SecretKeySelector


class EnvVar(K8sModel):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


class ResourceRequirements(K8sModel):
    requests: dict[str, str]
    limits: dict[str, str]


class ContainerPort(K8sModel):
    container_port: int
    name: str


class VolumeMount(K8sModel):
    name: str
    mount_path: str
    read_only: bool | None = None


class Container(K8sModel):
    name: str
    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: list[str] | None = None
    ports: list[ContainerPort] | None = None
    env: list[EnvVar] | None = None
    resources: ResourceRequirements
    volume_mounts: list[VolumeMount] | None = None


class Toleration(K8sModel):
    key: str
    operator: Literal["Exists", "Equal"]
    effect: str
    value: str | None = None


class PersistentVolumeClaimVolumeSource(K8sModel):
    claim_name: str


class SecretVolumeSource(K8sModel):
    secret_name: str
    optional: bool | None = None


class Volume(K8sModel):
    name: str
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = None
    secret: SecretVolumeSource | None = None


class PodSpec(K8sModel):
    containers: list[Container]
    restart_policy: Literal["Always", "OnFailure", "Never"] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    volumes: list[Volume] | None = None


class PodTemplateSpec(K8sModel):
    metadata: dict[str, Any] | None = None
    spec: PodSpec


class VolumeResourceRequirements(K8sModel):
    requests: dict[str, str]


class PersistentVolumeClaimSpec(K8sModel):
    access_modes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"]]
    resources: VolumeResourceRequirements
    storage_class_name: str | None = None


class PersistentVolumeClaim(K8sModel):
    api_version: Literal["v1"] = "v1"
    kind: Literal["PersistentVolumeClaim"] = "PersistentVolumeClaim"
    metadata: ObjectMeta
    spec: PersistentVolumeClaimSpec


# --- batch/v1 -------------------------------------------------------------------------


class JobSpec(K8sModel):
    backoff_limit: int
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    template: PodTemplateSpec


class Job(K8sModel):
    api_version: Literal["batch/v1"] = "batch/v1"
    kind: Literal["Job"] = "Job"
    metadata: ObjectMeta
    spec: JobSpec


class JobTemplateSpec(K8sModel):
    spec: JobSpec


class CronJobSpec(K8sModel):
    schedule: str
    concurrency_policy: Literal["Allow", "Forbid", "Replace"]
    starting_deadline_seconds: int | None = None
    successful_jobs_history_limit: int | None = None
    failed_jobs_history_limit: int | None = None
    job_template: JobTemplateSpec


class CronJob(K8sModel):
    api_version: Literal["batch/v1"] = "batch/v1"
    kind: Literal["CronJob"] = "CronJob"
    metadata: ObjectMeta
    spec: CronJobSpec


# --- ray.io/v1 (KubeRay v1.7.0) -----------------------------------------------------


class HeadGroupSpec(K8sModel):
    ray_start_params: dict[str, str]
    template: PodTemplateSpec


class WorkerGroupSpec(K8sModel):
    group_name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    ray_start_params: dict[str, str]
    template: PodTemplateSpec


class AutoscalerOptions(K8sModel):
    version: Literal["v1", "v2"]
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"]
    idle_timeout_seconds: int
    resources: ResourceRequirements | None = None


class RayClusterSpec(K8sModel):
    ray_version: str
    enable_in_tree_autoscaling: bool
    autoscaler_options: AutoscalerOptions | None = None
    head_group_spec: HeadGroupSpec
    worker_group_specs: list[WorkerGroupSpec] | None = None


class RayServiceUpgradeStrategy(K8sModel):
    # KubeRay v1.7.0 accepts NewCluster, NewClusterWithIncrementalUpgrade and None
    # (ray-operator/apis/ray/v1/rayservice_types.go; the CRD types it as a plain string).
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]


class RayServiceSpec(K8sModel):
    upgrade_strategy: RayServiceUpgradeStrategy
    serve_config_v2: str
    ray_cluster_config: RayClusterSpec


class RayService(K8sModel):
    api_version: Literal["ray.io/v1"] = "ray.io/v1"
    kind: Literal["RayService"] = "RayService"
    metadata: ObjectMeta
    spec: RayServiceSpec


# --- kustomize ------------------------------------------------------------------------


class KustomizePatch(K8sModel):
    path: str


class ConfigMapGenerator(K8sModel):
    name: str
    files: list[str]
    options: dict[str, Any] | None = None


class Kustomization(K8sModel):
    api_version: Literal["kustomize.config.k8s.io/v1beta1"] = "kustomize.config.k8s.io/v1beta1"
    kind: Literal["Kustomization"] = "Kustomization"
    resources: list[str]
    patches: list[KustomizePatch] | None = None
    config_map_generator: list[ConfigMapGenerator] | None = None


class KustomizeComponent(K8sModel):
    """A kustomize Component: resources and patches an overlay opts into (``components:``)."""

    api_version: Literal["kustomize.config.k8s.io/v1alpha1"] = "kustomize.config.k8s.io/v1alpha1"
    kind: Literal["Component"] = "Component"
    resources: list[str] | None = None
    patches: list[KustomizePatch]


# --- prometheus-operator (monitoring.coreos.com/v1) --------------------------------------


class LabelSelector(K8sModel):
    match_labels: dict[str, str]


class PodMetricsEndpoint(K8sModel):
    port: str
    path: str | None = None
    interval: str | None = None


class PodMonitorSpec(K8sModel):
    job_label: str | None = None
    selector: LabelSelector
    pod_metrics_endpoints: list[PodMetricsEndpoint]


class PodMonitor(K8sModel):
    api_version: Literal["monitoring.coreos.com/v1"] = "monitoring.coreos.com/v1"
    kind: Literal["PodMonitor"] = "PodMonitor"
    metadata: ObjectMeta
    spec: PodMonitorSpec
