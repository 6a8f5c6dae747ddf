"""The cost simulator checked against the autoscaling lane: one trace, two timelines.

The lane (:mod:`cluster.simulate`) replays a load trace on the fake multi-node cluster and
samples its replicas and nodes; :mod:`cluster.cost` simulates the same trace under the same
Serve config. This module (pure: no Ray) turns the lane's samples into per-second
timelines, derives the simulator's timing inputs from what the lane measured (service
time per deployment, replica start, node start), and compares the two timelines:

- per deployment: replica-seconds (relative error), mean absolute replica difference,
  peak, the second the count first rises above its start (scale-up) and the second it is
  back at its start after the load (scale-down);
- per pool: the same over nodes (node-seconds are what KubeRay bills).

The lane's timings are inputs of the simulation, measured in the same run; the
autoscaling decisions (replica counts over time, nodes over time) are what is compared.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Serve's replica states that hold the replica's resources (a STOPPING replica's are being
# released: the simulator removes a replica at once).
ACTIVE_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION"})


def _good(samples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((s for s in samples if "error" not in s), key=lambda s: s["t"])


def per_second(
    samples: Sequence[Mapping[str, Any]],
    t0: float,
    duration_s: int,
    value: Callable[[Mapping[str, Any]], int],
) -> list[int]:
    """``value(sample)`` at each second ``t0 + k`` (k < duration_s): the last sample at or
    before that time (the first sample before any)."""
    good = _good(samples)
    if not good:
        raise ValueError("no samples")
    out, i = [], 0
    for k in range(duration_s):
        t = t0 + k
        while i + 1 < len(good) and good[i + 1]["t"] <= t:
            i += 1
        out.append(value(good[i]))
    return out


def active_replicas(sample: Mapping[str, Any], deployment: str) -> int:
    d = (sample.get("deployments") or {}).get(deployment) or {}
    return sum(1 for r in d.get("replicas") or [] if r.get("state") in ACTIVE_STATES)


def lane_timelines(
    samples: Sequence[Mapping[str, Any]],
    t0: float,
    duration_s: int,
    deployments: Sequence[str],
    pools: Sequence[str],
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(replicas per deployment, nodes per pool), one value per second from ``t0``."""

    def nodes_of(pool: str) -> Callable[[Mapping[str, Any]], int]:
        return lambda s: int((s.get("pools") or {}).get(pool, 0))

    def replicas_of(deployment: str) -> Callable[[Mapping[str, Any]], int]:
        return lambda s: active_replicas(s, deployment)

    replicas = {d: per_second(samples, t0, duration_s, replicas_of(d)) for d in deployments}
    nodes = {p: per_second(samples, t0, duration_s, nodes_of(p)) for p in pools}
    return replicas, nodes


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def calibrate(
    samples: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    baseline_ids: Mapping[str, set[str]],
    durations: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, dict[str, float]]:
    """The simulator's timing inputs, as the lane measured them.

    - ``service_s``: per deployment, how long one request held a replica slot: the mean
      of ``durations`` (seconds each request spent in a replica of it, from the replicas'
      access logs); where none were logged, the mean latency of its successful requests
      at the client (the ``Ingress``: of all requests), an upper bound;
    - ``replica_start_s``: per deployment, the median over its new replicas of the
      seconds from the replica (or, if later, its node) first seen to the replica RUNNING;
      a deployment with no new replica gets the median of the others;
    - ``node_start_s``: per pool, the median over new nodes of the seconds from the first
      replica placed on it first seen (pending) to the node first seen.
    """
    ok = [r for r in results if r.get("status") == 200]
    service: dict[str, float] = {}
    for name in {r["deployment"] for r in ok}:
        service[name] = statistics.fmean(r["t1"] - r["t0"] for r in ok if r["deployment"] == name)
    if ok:
        service["Ingress"] = statistics.fmean(r["t1"] - r["t0"] for r in ok)
    for name, values in (durations or {}).items():
        if values:
            service[name] = statistics.fmean(values)

    good = _good(samples)
    node_seen: dict[str, float] = {}
    node_pool: dict[str, str] = {}
    first_nodes = set((good[0].get("nodes") or {}) if good else ())
    rep_seen: dict[tuple[str, str], float] = {}
    rep_running: dict[tuple[str, str], float] = {}
    rep_node: dict[tuple[str, str], str] = {}
    for s in good:
        for node, pool in (s.get("nodes") or {}).items():
            node_seen.setdefault(node, s["t"])
            node_pool[node] = pool
        for name, d in (s.get("deployments") or {}).items():
            for r in d.get("replicas") or []:
                rid = r.get("id")
                if not rid or rid in baseline_ids.get(name, set()):
                    continue
                key = (name, rid)
                rep_seen.setdefault(key, s["t"])
                if r.get("node"):
                    rep_node[key] = r["node"]
                if r.get("state") == "RUNNING":
                    rep_running.setdefault(key, s["t"])
    starts: dict[str, list[float]] = {}
    for key, t_run in rep_running.items():
        t_from = max(rep_seen[key], node_seen.get(rep_node.get(key, ""), rep_seen[key]))
        starts.setdefault(key[0], []).append(max(0.0, t_run - t_from))
    replica_start = {n: float(statistics.median(v)) for n, v in starts.items()}
    everyone = _median([x for v in starts.values() for x in v])
    if everyone is not None:
        for name in baseline_ids:
            replica_start.setdefault(name, float(everyone))

    node_waits: dict[str, list[float]] = {}
    for node, t_node in node_seen.items():
        if node in first_nodes:
            continue
        placed = [rep_seen[k] for k, n in rep_node.items() if n == node]
        if placed:
            node_waits.setdefault(node_pool[node], []).append(max(0.0, t_node - min(placed)))
    node_start = {p: float(statistics.median(v)) for p, v in node_waits.items()}
    return {"service_s": service, "replica_start_s": replica_start, "node_start_s": node_start}


def _first(values: Sequence[int], pred: Callable[[int], bool], start: int = 0) -> int | None:
    return next((k for k in range(start, len(values)) if pred(values[k])), None)


def compare_series(real: Sequence[int], sim: Sequence[int], load_end_s: int) -> dict[str, Any]:
    """Error metrics of one simulated timeline against the lane's (same length, 1 s)."""
    if len(real) != len(sim) or not real:
        raise ValueError(f"timelines of different or no length: {len(real)} vs {len(sim)}")
    base = real[0]
    real_s, sim_s = sum(real), sum(sim)
    up_real = _first(real, lambda v: v > base)
    up_sim = _first(sim, lambda v: v > base)  # the lane's start: both start there
    peak_k_real = up_real if up_real is not None else load_end_s
    peak_k_sim = up_sim if up_sim is not None else load_end_s
    back_real = _first(real, lambda v: v <= base, max(load_end_s, peak_k_real))
    back_sim = _first(sim, lambda v: v <= base, max(load_end_s, peak_k_sim))
    return {
        "real_unit_s": real_s,
        "sim_unit_s": sim_s,
        "rel_err": (sim_s - real_s) / real_s if real_s else (0.0 if sim_s == 0 else None),
        "mae": sum(abs(a - b) for a, b in zip(real, sim, strict=True)) / len(real),
        "start": [base, sim[0]],
        "peak": [max(real), max(sim)],
        "up_s": [up_real, up_sim],
        "up_diff_s": None if up_real is None or up_sim is None else up_sim - up_real,
        "back_s": [
            back_real if up_real is not None else None,
            back_sim if up_sim is not None else None,
        ],
    }


def compare(
    real_replicas: Mapping[str, Sequence[int]],
    sim_replicas: Mapping[str, Sequence[int]],
    real_nodes: Mapping[str, Sequence[int]],
    sim_nodes: Mapping[str, Sequence[int]],
    load_end_s: int,
) -> dict[str, Any]:
    """Per deployment and per pool metrics, and totals: replica-seconds and node-seconds
    relative error over everything compared, and the mean of the per-series MAE."""
    deployments = {
        d: compare_series(real_replicas[d], sim_replicas[d], load_end_s) for d in real_replicas
    }
    pools = {p: compare_series(real_nodes[p], sim_nodes[p], load_end_s) for p in real_nodes}

    def total(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        real = sum(r["real_unit_s"] for r in rows.values())
        sim = sum(r["sim_unit_s"] for r in rows.values())
        maes = [r["mae"] for r in rows.values()]
        return {
            "real_unit_s": real,
            "sim_unit_s": sim,
            "rel_err": (sim - real) / real if real else None,
            "mean_mae": statistics.fmean(maes) if maes else 0.0,
        }

    return {
        "deployments": deployments,
        "pools": pools,
        "replicas_total": total(deployments),
        "nodes_total": total(pools),
    }


def format_check(check: Mapping[str, Any]) -> str:
    """A text table of :func:`compare`'s result (the lane prints it)."""

    def s(v: Any) -> str:
        return "-" if v is None else (f"{v:+.0%}" if isinstance(v, float) else str(v))

    def pair(v: Sequence[Any]) -> str:
        return "/".join(s(x) for x in v)

    lines = [
        f"{'':12s} {'lane unit-s':>11s} {'sim unit-s':>10s} {'rel err':>8s} {'MAE':>5s} "
        f"{'peak lane/sim':>13s} {'up lane/sim s':>13s} {'back lane/sim s':>15s}"
    ]
    for kind in ("deployments", "pools"):
        for name, r in check[kind].items():
            lines.append(
                f"{name:12s} {r['real_unit_s']:11d} {r['sim_unit_s']:10d} {s(r['rel_err']):>8s} "
                f"{r['mae']:5.2f} {pair(r['peak']):>13s} {pair(r['up_s']):>13s} "
                f"{pair(r['back_s']):>15s}"
            )
    for kind in ("replicas_total", "nodes_total"):
        r = check[kind]
        lines.append(
            f"{kind}: lane {r['real_unit_s']} s, sim {r['sim_unit_s']} s, "
            f"rel err {s(r['rel_err'])}, mean MAE {r['mean_mae']:.2f}"
        )
    return "\n".join(lines)
