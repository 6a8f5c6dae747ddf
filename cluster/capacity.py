"""Before ``serve run`` on a running Ray cluster: can some node host each deployment?

    python -m cluster check-capacity [--config cluster/serve-prod.yaml] [--address auto]

Ray Serve does not fail a replica whose resources no node advertises: a replica that
asks for ``accelerator_type:A100-80G`` on a cluster of CPU nodes stays pending forever,
and ``serve run`` waits with it. This check reads what the cluster's live nodes advertise
(``ray.nodes()``) and, for every deployment of the config as Serve will run it
(:mod:`cluster.serve_config`), whether one node has every resource one replica reserves;
a deployment that fits nowhere is an error naming the resources no node has. Exit 1 then,
so ``python -m cluster check-capacity && serve run cluster/serve-prod.yaml`` fails fast.

An autoscaling cluster (KubeRay, the fake multi-node cluster) starts nodes on demand: its
nodes are not all up before the deploy, so there the renderer's own checks
(:mod:`cluster.placement`) are what holds, not this one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from .findings import Finding
from .serve_config import Deployment

_EPS = 1e-9


def _fits(replica: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) + _EPS >= v for k, v in replica.items() if v > 0)


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(
        f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}"
        for k, v in sorted(resources.items())
        if v > 0
    )


def unplaceable(
    deployments: Iterable[Deployment], nodes: Sequence[Mapping[str, float]]
) -> list[Finding]:
    """An error per deployment no single node of ``nodes`` (each node's total resources)
    can host one replica of."""
    advertised = sorted({k for n in nodes for k in n if not k.startswith("node:")})
    findings = []
    for d in deployments:
        replica = {k: v for k, v in d.resources.items() if v > 0}
        if any(_fits(replica, n) for n in nodes):
            continue
        missing = [
            k for k, v in replica.items() if not any(n.get(k, 0.0) + _EPS >= v for n in nodes)
        ]
        if missing:
            why = "no node has " + ", ".join(
                f"{k} (a replica needs {_fmt({k: replica[k]})})" for k in missing
            )
        else:
            why = f"no single node has all of {_fmt(replica)} together"
        findings.append(
            Finding(
                "error",
                d.path,
                f"{d.name}: {why}; Serve would wait for it forever. The cluster's nodes "
                f"advertise: {', '.join(advertised) or 'nothing'}",
            )
        )
    return findings


def live_nodes(address: str) -> list[dict[str, float]]:
    """The total resources of every live node of the Ray cluster at ``address``."""
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
