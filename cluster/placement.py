"""Which pool each deployment runs on, and how many nodes each pool needs.

The worker-group bounds are derived here, once, for KubeRay and for the fake cluster:

For a pool on a cloud, with node resources N (the pod's CPUs, its GPUs, Ray's memory
resource, the pool's marker resource) and, for each deployment d pinned to it, the
replica's resources r_d, its replica bounds [min_d, max_d] and
``fit_d = min over resources k of floor(N[k] / r_d[k])`` (capped by
``max_replicas_per_node``) replicas per node:

- ``maxReplicas = sum_d ceil(max_d / fit_d)``: enough nodes for every deployment at its
  maximum even when each packs only with itself, so Serve can always reach
  ``max_replicas``, and the pool never has more nodes than Serve can fill;
- ``minReplicas = max over k of ceil(sum_d min_d * r_d[k] / N[k])``: the fewest nodes that
  can hold the minimum replicas at all (by volume). The autoscaler adds a node when the
  packing needs one more, and never keeps an idle node up for nothing.

A deployment whose replica fits on no node of its pool, or a pool whose maxReplicas
exceeds the cloud pool's ``max_nodes``, is an error: those bounds can never be met.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .findings import Finding, join_path
from .pools import (
    POOLS,
    Cloud,
    NodeShape,
    NoPoolError,
    Pool,
    UnpinnedError,
    by_name,
    pool_for_options,
)
from .serve_config import Deployment

_EPS = 1e-9


def marker_resources(pool: Pool, shape: NodeShape) -> dict[str, float]:
    """The custom resources a node of ``pool`` advertises: its pool's marker, and those of
    the pools its shape hosts (``NodeShape.hosts``)."""
    return {pool.ray_resource: 1.0, **{by_name(name).ray_resource: 1.0 for name in shape.hosts}}


def host_pool(pool: Pool, cloud: Cloud) -> Pool:
    """The pool whose nodes run ``pool``'s replicas on ``cloud``: itself, or a pool whose
    node shape there hosts it."""
    for other in POOLS:
        if cloud in other.shapes and pool.name in other.shape(cloud).hosts:
            return other
    return pool


def node_resources(pool: Pool, shape: NodeShape) -> dict[str, float]:
    """The Ray resources one node (one worker pod) of ``pool`` advertises."""
    resources = {
        "CPU": float(shape.pod_cpus),
        "memory": shape.ray_memory_bytes,
        **marker_resources(pool, shape),
    }
    if shape.gpus:
        resources["GPU"] = float(shape.gpus)
    return resources


def replicas_per_node(
    replica: Mapping[str, float], node: Mapping[str, float], max_per_node: int | None = None
) -> int:
    """How many replicas fit on one node (0: not even one)."""
    fit = math.inf
    for name, amount in replica.items():
        if amount <= 0:
            continue
        fit = min(fit, math.floor(node.get(name, 0.0) / amount + _EPS))
    if max_per_node is not None:
        fit = min(fit, max_per_node)
    return 0 if fit == math.inf else int(fit)


@dataclass(frozen=True)
class GroupBounds:
    """A pool's worker group on one cloud: its node bounds and why."""

    pool: Pool
    cloud: Cloud
    shape: NodeShape
    min_nodes: int
    max_nodes: int
    deployments: tuple[Deployment, ...]
    per_node: Mapping[str, int]  # deployment key -> replicas per node

    def explain(self) -> str:
        terms = ", ".join(
            f"{d.key}: replicas {d.min_replicas}..{d.max_replicas}, {self.per_node[d.key]} per node"
            for d in self.deployments
        )
        return (
            f"{self.pool.name} on {self.cloud} ({self.shape.instance_type}): nodes "
            f"{self.min_nodes}..{self.max_nodes} <- {terms}"
        )


def assign(
    deployments: Iterable[Deployment], *, unpinned_is_error: bool
) -> tuple[dict[str, list[Deployment]], list[Finding]]:
    """Pool name -> its deployments (in table order). Unpinned CPU replicas go to the CPU
    pool, with a warning (or an error when ``unpinned_is_error``)."""
    by_pool: dict[str, list[Deployment]] = {p.name: [] for p in POOLS}
    findings: list[Finding] = []
    for d in deployments:
        try:
            pool = pool_for_options(d.ray_actor_options)
        except UnpinnedError as e:
            findings.append(
                Finding(
                    "error" if unpinned_is_error else "warning",
                    join_path(d.path, "ray_actor_options"),
                    f"{d.key}: {e.reason}",
                    e.suggestion,
                )
            )
            pool = next(p for p in POOLS if not p.is_gpu)
        except NoPoolError as e:
            where = "accelerator_type" if d.ray_actor_options.get("accelerator_type") else ""
            findings.append(
                Finding(
                    "error",
                    join_path(d.path, "ray_actor_options", *([where] if where else [])),
                    f"{d.key}: {e.reason}",
                    e.suggestion,
                )
            )
            continue
        by_pool[pool.name].append(d)
    return {k: v for k, v in by_pool.items() if v}, findings


def group_bounds(
    pool: Pool, cloud: Cloud, deployments: list[Deployment]
) -> tuple[GroupBounds | None, list[Finding]]:
    """The node bounds of ``pool`` on ``cloud`` for its deployments (None on error)."""
    shape = pool.shape(cloud)
    node = node_resources(pool, shape)
    findings: list[Finding] = []
    per_node: dict[str, int] = {}
    for d in deployments:
        fit = replicas_per_node(d.resources, node, d.max_replicas_per_node)
        if fit < 1:
            short = sorted(
                k for k, v in d.resources.items() if v > 0 and node.get(k, 0.0) + _EPS < v
            )
            findings.append(
                Finding(
                    "error",
                    join_path(d.path, "ray_actor_options"),
                    f"{d.key}: one replica needs "
                    + ", ".join(f"{k}={_fmt(d.resources[k])}" for k in short)
                    + f" but a {pool.name} node on {cloud} ({shape.instance_type}) has "
                    + ", ".join(f"{k}={_fmt(node.get(k, 0.0))}" for k in short)
                    + ": no node of the pool can hold it",
                    "lower the per-replica resources or use a pool with bigger nodes",
                )
            )
        per_node[d.key] = fit
    if findings:
        return None, findings
    max_nodes = sum(math.ceil(d.max_replicas / per_node[d.key]) for d in deployments)
    min_nodes = 0
    for name, capacity in node.items():
        need = sum(d.min_replicas * d.resources.get(name, 0.0) for d in deployments)
        if need > 0:
            min_nodes = max(min_nodes, math.ceil(need / capacity - _EPS))
    bounds = GroupBounds(pool, cloud, shape, min_nodes, max_nodes, tuple(deployments), per_node)
    if max_nodes > shape.max_nodes:
        findings.append(
            Finding(
                "error",
                ", ".join(d.path for d in deployments),
                f"pool {pool.name} on {cloud} would need up to {max_nodes} "
                f"{shape.instance_type} nodes (sum of max_replicas / replicas per node) "
                f"but the pool allows {shape.max_nodes}: {bounds.explain()}",
                "lower max_replicas, or raise the pool's max_nodes in cluster/pools.py "
                "together with the cloud node pool / quota",
            )
        )
    return bounds, findings


def plan(
    deployments: Iterable[Deployment], cloud: Cloud, *, unpinned_is_error: bool
) -> tuple[list[GroupBounds], list[Finding]]:
    """Worker groups (one per pool in use, in pool-table order) and findings."""
    assigned, findings = assign(deployments, unpinned_is_error=unpinned_is_error)
    by_pool: dict[str, list[Deployment]] = {}
    for pool in POOLS:  # hosted pools' deployments join their host's group
        if pool.name in assigned:
            by_pool.setdefault(host_pool(pool, cloud).name, []).extend(assigned[pool.name])
    groups: list[GroupBounds] = []
    for pool in POOLS:
        if pool.name not in by_pool:
            continue
        bounds, more = group_bounds(pool, cloud, by_pool[pool.name])
        findings += more
        if bounds is not None:
            groups.append(bounds)
    return groups, findings


def _fmt(value: float) -> str:
    if value >= 2**20:
        return f"{value / 2**30:.1f}GiB"
    return f"{value:g}"
