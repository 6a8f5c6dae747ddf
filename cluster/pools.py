"""The node pools every target is derived from: ONE typed table.

A *pool* is a kind of node the graph's replicas run on: a GPU model (A100 80GB, A100 40GB)
or plain CPU. Each target reads the pool it needs from here:

- KubeRay (``cluster.render``): one worker group per pool, with the pool's node selector,
  tolerations, pod size and ``rayStartParams`` that advertise :attr:`Pool.ray_resource`;
- the local fake multi-node cluster (``cluster.fake_cluster``): one node type per pool,
  with the same Ray resources, so the autoscaling simulation schedules like KubeRay does;
- Modal (``modal_adapter``): :meth:`Pool.modal_gpu_spec` gives the ``gpu=`` argument.

How a Serve deployment picks its pool (:func:`pool_for_options`): a GPU deployment names
``ray_actor_options.accelerator_type`` (``A100-80G``, ``A100-40G``: the sized names of
``ray.util.accelerators``); a CPU deployment asks for a sliver of the CPU pool's marker
resource (``resources: {"pool:cpu": 0.001}``), which pins it off the GPU nodes. Ray turns
``accelerator_type: X`` into a request for 0.001 of the resource ``accelerator_type:X``,
and each pool's nodes advertise exactly that resource, so the pin is the same mechanism
on every Ray cluster.

Node shapes differ per cloud: GKE has 1-GPU A100 machines (``a2-highgpu-1g``,
``a2-ultragpu-1g``), EKS does not (the smallest A100 instances, ``p4d.24xlarge`` and
``p4de.24xlarge``, have 8 GPUs). A pool therefore has one :class:`NodeShape` per cloud,
and the worker-group bounds are derived per cloud.

This module imports nothing beyond the standard library: the Modal adapter and the
linter read it without Ray.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Cloud = Literal["gke", "eks"]
CLOUDS: tuple[Cloud, ...] = ("gke", "eks")

# Ray's resource naming (ray._common.utils.resources_from_ray_options): accelerator_type=X
# becomes a request for 0.001 of "accelerator_type:X".
ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
# What a replica asks of a pool's marker resource; a node advertises 1 of it.
PIN_AMOUNT = 0.001
# Ray reserves this share of a node's memory for the object store by default
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION); the rest is the "memory" resource.
RAY_OBJECT_STORE_SHARE = 0.3
GIB = 2**30


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"
    value: str | None = None


# GKE taints every GPU node `nvidia.com/gpu=present:NoSchedule`; on EKS the GPU node
# groups/NodePools are tainted `nvidia.com/gpu:NoSchedule` by convention (set it when
# creating the node group). Tolerating the key with `Exists` matches both.
GPU_TOLERATION = Toleration(key="nvidia.com/gpu")


@dataclass(frozen=True)
class NodeShape:
    """One cloud's machine for a pool, and what one Ray worker pod takes of it.

    One Ray worker pod per node: the pod asks for every GPU of the machine and most of its
    CPU and memory (the rest is the kubelet's and the system daemons' reserve).
    """

    cloud: Cloud
    instance_type: str  # GKE machine type or EC2 instance type
    gpus: int
    vcpus: int
    memory_gib: int
    pod_cpus: int
    pod_memory_gib: int
    node_selector: Mapping[str, str]
    tolerations: tuple[Toleration, ...] = ()
    # The node pool's (or quota's) cap: the rendered maxReplicas must not exceed it.
    max_nodes: int = 8
    # Other pools whose replicas this node runs too (a bigger GPU of the same family):
    # where a node has many GPUs, a small deployment packs onto it instead of holding a
    # whole node of its own pool (cluster.placement; the node advertises their markers).
    hosts: tuple[str, ...] = ()

    @property
    def ray_memory_bytes(self) -> float:
        """The ``memory`` resource Ray advertises for the pod (object store excluded)."""
        return self.pod_memory_gib * GIB * (1 - RAY_OBJECT_STORE_SHARE)


@dataclass(frozen=True)
class Pool:
    """A kind of node. ``name`` is the worker group name, the fake node type name and the
    Ray node label ``ray.io/node-group`` (KubeRay and the fake provider both set it)."""

    name: str
    description: str
    # Ray: the sized accelerator type a deployment names (None for the CPU pool).
    ray_accelerator_type: str | None
    # Ray: the type Ray detects by itself on this hardware (the unsized "A100"): it
    # matches several pools, so the linter asks for the sized name instead.
    ray_detected_accelerator_type: str | None
    # Modal: the `gpu=` string, and what Modal may use when that one is short.
    modal_gpu: str | None
    modal_gpu_fallbacks: tuple[str, ...]
    gpu_memory_gib: int
    shapes: Mapping[Cloud, NodeShape] = field(default_factory=dict)

    @property
    def is_gpu(self) -> bool:
        return self.ray_accelerator_type is not None

    @property
    def ray_resource(self) -> str:
        """The custom resource this pool's nodes advertise (1 per node) and its replicas pin to."""
        if self.ray_accelerator_type is not None:
            return ACCELERATOR_RESOURCE_PREFIX + self.ray_accelerator_type
        return f"pool:{self.name}"

    def shape(self, cloud: Cloud) -> NodeShape:
        try:
            return self.shapes[cloud]
        except KeyError:
            raise KeyError(f"pool {self.name!r} has no node shape on {cloud!r}") from None

    def modal_gpu_spec(self, count: int = 1) -> str | list[str] | None:
        """The ``gpu=`` argument of a Modal class for ``count`` GPUs of this pool: None for
        the CPU pool, a string, or a list (first choice first) when there are fallbacks."""
        if self.modal_gpu is None:
            return None
        if count < 1:
            raise ValueError(f"a GPU pool needs count >= 1, got {count}")
        names = [self.modal_gpu, *self.modal_gpu_fallbacks]
        specs = [n if count == 1 else f"{n}:{count}" for n in names]
        return specs[0] if len(specs) == 1 else specs


A100_80GB = Pool(
    name="a100-80gb",
    description="NVIDIA A100 80GB: the LLM and codegen engines",
    ray_accelerator_type="A100-80G",  # ray.util.accelerators.accelerators.NVIDIA_A100_80G
    ray_detected_accelerator_type="A100",
    modal_gpu="A100-80GB",
    modal_gpu_fallbacks=("H100",),  # 80 GB as well, and faster: safe for an 80 GB workload
    gpu_memory_gib=80,
    shapes={
        "gke": NodeShape(
            cloud="gke",
            instance_type="a2-ultragpu-1g",
            gpus=1,
            vcpus=12,
            memory_gib=170,
            pod_cpus=10,
            pod_memory_gib=140,
            node_selector={
                "cloud.google.com/gke-accelerator": "nvidia-a100-80gb",
                "node.kubernetes.io/instance-type": "a2-ultragpu-1g",
            },
            tolerations=(GPU_TOLERATION,),
            max_nodes=8,
        ),
        "eks": NodeShape(
            cloud="eks",
            instance_type="p4de.24xlarge",  # 8 x A100 80GB: no smaller A100-80GB on EC2
            gpus=8,
            vcpus=96,
            memory_gib=1152,
            pod_cpus=90,
            pod_memory_gib=1000,
            node_selector={"node.kubernetes.io/instance-type": "p4de.24xlarge"},
            tolerations=(GPU_TOLERATION,),
            # Up to 4 when every deployment packs only with itself (cluster.placement);
            # by volume the production config's maximum is 7 of one node's 8 GPUs.
            max_nodes=4,
            # The vision models (half an A100 40GB each) share a p4de with the LLMs
            # instead of holding a p4d (8 x A100 40GB) for one GPU's worth of work.
            hosts=("a100-40gb",),
        ),
    },
)

A100_40GB = Pool(
    name="a100-40gb",
    description="NVIDIA A100 40GB: vision models (SAM)",
    ray_accelerator_type="A100-40G",  # ray.util.accelerators.accelerators.NVIDIA_A100_40G
    ray_detected_accelerator_type="A100",
    modal_gpu="A100-40GB",
    modal_gpu_fallbacks=("A100-80GB",),  # a bigger A100 runs a 40 GB workload
    gpu_memory_gib=40,
    shapes={
        "gke": NodeShape(
            cloud="gke",
            instance_type="a2-highgpu-1g",
            gpus=1,
            vcpus=12,
            memory_gib=85,
            pod_cpus=10,
            pod_memory_gib=68,
            node_selector={
                "cloud.google.com/gke-accelerator": "nvidia-tesla-a100",
                "node.kubernetes.io/instance-type": "a2-highgpu-1g",
            },
            tolerations=(GPU_TOLERATION,),
            max_nodes=8,
        ),
        "eks": NodeShape(
            cloud="eks",
            instance_type="p4d.24xlarge",  # 8 x A100 40GB: no smaller A100 on EC2
            gpus=8,
            vcpus=96,
            memory_gib=1152,
            pod_cpus=90,
            pod_memory_gib=1000,
            node_selector={"node.kubernetes.io/instance-type": "p4d.24xlarge"},
            tolerations=(GPU_TOLERATION,),
            max_nodes=2,
        ),
    },
)

CPU = Pool(
    name="cpu",
    description="CPU only: the HTTP ingress and CPU models (no GPU, no taint)",
    ray_accelerator_type=None,
    ray_detected_accelerator_type=None,
    modal_gpu=None,
    modal_gpu_fallbacks=(),
    gpu_memory_gib=0,
    shapes={
        "gke": NodeShape(
            cloud="gke",
            instance_type="n2-standard-8",
            gpus=0,
            vcpus=8,
            memory_gib=32,
            pod_cpus=6,
            pod_memory_gib=24,
            node_selector={"node.kubernetes.io/instance-type": "n2-standard-8"},
            # Six CPU-pool services (ingress, grounder, and every replica of a CPU-only
            # config) each get a node in the worst-case packing; CPU nodes are cheap.
            max_nodes=8,
        ),
        "eks": NodeShape(
            cloud="eks",
            instance_type="m6i.2xlarge",
            gpus=0,
            vcpus=8,
            memory_gib=32,
            pod_cpus=6,
            pod_memory_gib=24,
            node_selector={"node.kubernetes.io/instance-type": "m6i.2xlarge"},
            max_nodes=8,
        ),
    },
)

POOLS: tuple[Pool, ...] = (A100_80GB, A100_40GB, CPU)
CPU_POOL = CPU


class NoPoolError(ValueError):
    """No pool matches; ``suggestion`` is a close, valid alternative (or None)."""

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message + (f" (did you mean {suggestion!r}?)" if suggestion else ""))
        self.reason = message
        self.suggestion = suggestion


class UnpinnedError(NoPoolError):
    """A CPU replica that names no pool: fine on one machine (``serve run``), a warning
    for a cluster (it may land on a GPU node), an error when rendering one."""


def by_name(name: str) -> Pool:
    for pool in POOLS:
        if pool.name == name:
            return pool
    raise NoPoolError(
        f"no pool named {name!r}; pools: {[p.name for p in POOLS]}",
        _closest(name, [p.name for p in POOLS]),
    )


def pool_for(accelerator_type: str | None) -> Pool:
    """The pool of a Ray ``accelerator_type`` (``None``: the CPU pool).

    Raises :class:`NoPoolError` for a type no pool provides, with a suggestion: the Modal
    spelling (``A100-80GB``) maps to the Ray one (``A100-80G``), and the unsized ``A100``
    (which Ray detects on every A100) asks for a sized name.
    """
    if accelerator_type is None:
        return CPU_POOL
    for pool in POOLS:
        if pool.ray_accelerator_type == accelerator_type:
            return pool
    for pool in POOLS:
        if pool.modal_gpu is not None and pool.modal_gpu.lower() == accelerator_type.lower():
            raise NoPoolError(
                f"{accelerator_type!r} is Modal's name for pool {pool.name!r}; Ray's "
                f"accelerator_type is {pool.ray_accelerator_type!r}",
                pool.ray_accelerator_type,
            )
    detected = [p for p in POOLS if p.ray_detected_accelerator_type == accelerator_type]
    if detected:
        sized = [p.ray_accelerator_type for p in detected]
        raise NoPoolError(
            f"accelerator_type {accelerator_type!r} matches several pools ({sized}); "
            "name the sized type so the replica lands on one pool",
            sized[0],
        )
    known = [p.ray_accelerator_type for p in POOLS if p.ray_accelerator_type]
    raise NoPoolError(
        f"no pool provides accelerator_type {accelerator_type!r}; pools provide {known}",
        _closest(accelerator_type, [k for k in known if k]),
    )


def pool_for_options(ray_actor_options: Mapping[str, Any] | None) -> Pool:
    """The pool a Serve deployment's ``ray_actor_options`` pin it to.

    GPU replicas (``num_gpus > 0``) must name ``accelerator_type``; CPU replicas pin to the
    CPU pool with its marker resource. Raises :class:`NoPoolError` when the options name
    no pool (or two).
    """
    options = ray_actor_options or {}
    accelerator_type = options.get("accelerator_type")
    num_gpus = float(options.get("num_gpus") or 0)
    resources = options.get("resources") or {}
    markers = [p for p in POOLS if not p.is_gpu and p.ray_resource in resources]
    if accelerator_type is not None:
        pool = pool_for(accelerator_type)
        if markers:
            raise NoPoolError(
                f"accelerator_type {accelerator_type!r} and the {markers[0].name!r} pool "
                f"marker {markers[0].ray_resource!r} pin two pools; keep one"
            )
        return pool
    if num_gpus > 0:
        gpu_types = [p.ray_accelerator_type for p in POOLS if p.is_gpu]
        raise NoPoolError(
            f"num_gpus={num_gpus:g} without accelerator_type: the replica could land on any "
            f"GPU pool; set accelerator_type to one of {gpu_types}",
            gpu_types[0],
        )
    if len(markers) == 1:
        return markers[0]
    if len(markers) > 1:
        raise NoPoolError(f"pinned to several pools: {[p.name for p in markers]}")
    raise UnpinnedError(
        "CPU replica without a pool pin: on a cluster it may land on a GPU node's spare "
        f"CPUs and keep that node from scaling down; add resources: "
        f"{{{CPU_POOL.ray_resource!r}: {PIN_AMOUNT}}}",
        f"resources: {{{CPU_POOL.ray_resource}: {PIN_AMOUNT}}}",
    )


def modal_gpu(ray_actor_options: Mapping[str, Any] | None) -> str | list[str] | None:
    """Modal's ``gpu=`` for a Serve deployment's ``ray_actor_options`` (None: CPU only).

    Fractional ``num_gpus`` round up: a Modal container gets whole GPUs.
    """
    options = ray_actor_options or {}
    num_gpus = float(options.get("num_gpus") or 0)
    if num_gpus <= 0:
        return None
    pool = pool_for(options.get("accelerator_type"))
    if not pool.is_gpu:
        raise NoPoolError("num_gpus > 0 needs a GPU accelerator_type")
    count = max(1, -int(-num_gpus // 1))
    return pool.modal_gpu_spec(count)


def _closest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None
