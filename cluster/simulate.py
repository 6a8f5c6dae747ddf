"""The autoscaling simulation: the production graph's resource shape on a fake
multi-node Ray cluster (:mod:`cluster.fake_cluster`), with CPU-sized engines.

:func:`simulation_config` turns the production Serve config into the one the simulation
deploys, keeping what decides scheduling and scaling (every deployment's
``ray_actor_options`` (GPUs and accelerator types, now fake resources), replica bounds,
``target_ongoing_requests``, ``max_ongoing_requests``) and changing only:

- every model service's model to the embedded smoke model on the CPU (a service config
  whose ``model`` is null serves the smoke model; generic over ``AppArgs`` fields);
- the autoscaling delays to :data:`FAST_AUTOSCALING` (seconds instead of minutes);
- HTTP: the proxy on the head only (fake nodes share one IP), on a free local port;
- the front door: auth and rate limits off (no key exists here; a limit would refuse the
  load).

:func:`run` starts the cluster, deploys through the dashboard's REST API (what KubeRay
does with ``serveConfigV2``), applies a load step to every model service, and records a
timeline until every deployment and every pool is back to its minimum. It writes a JSON
report that the opt-in test lane (``tests/autoscaling``) asserts on and the benchmark
(``bench/autoscaling.py``) summarises.

    python -m cluster.simulate --out result.json [--load-s 60] [--cloud gke]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .cost_inputs import Trace
from .pools import POOLS, Cloud

# Seconds instead of minutes. metrics_interval_s is deprecated but is what sets the metrics
# push period in Ray 2.60. downscale_delay_s is long enough that a dip in the measured load
# while a new replica is still starting (a cold start takes 10-30 s on a busy 2-core box)
# does not cancel the scale-up.
FAST_AUTOSCALING = {
    "metrics_interval_s": 1.0,
    "look_back_period_s": 5.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 15.0,
    "downscale_to_zero_delay_s": 15.0,
}
IDLE_TIMEOUT_MINUTES = 0.1  # the fake autoscaler removes a node 6 s after it goes idle


def pool_of_node(resources: Mapping[str, float]) -> str:
    """A node's pool, by the marker resource it advertises (as the scheduler sees it)."""
    for pool in POOLS:
        if resources.get(pool.ray_resource):
            return pool.name
    return "?"


def smoke_args(import_path: str | None, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``args`` with every model service on the embedded smoke model, on the CPU."""
    from pydantic import BaseModel

    from .lint import ARGS_MODELS
    from .serve_config import import_builder

    model_path = ARGS_MODELS.get(str(import_path))
    if model_path is None:
        raise ValueError(f"no typed args model for {import_path!r}: cannot swap in smoke models")
    parsed = import_builder(model_path).model_validate(dict(args or {}))
    update: dict[str, Any] = {}
    for name in type(parsed).model_fields:
        service = getattr(parsed, name)
        # Every service config knows its own embedded CPU equivalent (AppArgs' as_smoke).
        if isinstance(service, BaseModel) and hasattr(service, "as_smoke"):
            update[name] = service.as_smoke()
    result: dict[str, Any] = parsed.model_copy(update=update).model_dump(mode="json")
    return result


def simulation_config(prod: Mapping[str, Any], http_port: int, cache_dir: str) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(prod))
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {"host": "127.0.0.1", "port": http_port}
    for app in cfg.get("applications") or []:
        app["args"] = smoke_args(app.get("import_path"), app.get("args"))
        # The front door is not what this measures: no API keys exist here (the key file
        # is a Kubernetes Secret), and a per-key limit would refuse the load.
        if "auth" in app["args"]:
            app["args"]["auth"] = {"enabled": False}
        if "rate_limits" in app["args"]:
            app["args"]["rate_limits"] = {}
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env.update(SERVE_APPS_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1")
        for d in app.get("deployments") or []:
            if d.get("autoscaling_config"):
                d["autoscaling_config"] = {**d["autoscaling_config"], **FAST_AUTOSCALING}
    return cfg


@dataclass
class LoadPlan:
    """One model service under load: the deployment, the model name, the concurrency."""

    deployment: str
    model: str
    concurrency: int


def load_plans(
    config: Mapping[str, Any], scale_by: int = 1, headroom: float = 1.0
) -> list[LoadPlan]:
    """Concurrency per model service so Serve wants ``min_replicas + scale_by`` replicas
    (Serve's target is ceil(ongoing / target_ongoing_requests)), capped at max, times
    ``headroom``: on a CPU-starved box part of the clients' requests wait in the proxy and
    the ingress, so fewer are "ongoing" at the service's handle than clients are open."""
    from serve_apps.registry import AppArgs, spec_for_key

    app = config["applications"][0]
    args = AppArgs.model_validate(app.get("args") or {})
    entries = {d["name"]: d for d in app.get("deployments") or []}
    plans = []
    for service, model_config in args.model_configs().items():
        name = spec_for_key(service).name
        scaling = entries.get(name, {}).get("autoscaling_config") or {}
        lo, hi = int(scaling.get("min_replicas", 1)), int(scaling.get("max_replicas", 1))
        target = float(scaling.get("target_ongoing_requests", 2))
        want = min(hi, lo + scale_by)
        clients = math.ceil(want * target * headroom)
        plans.append(LoadPlan(name, model_config.served_model_name, clients))
    return plans


# --- observation ----------------------------------------------------------------------


class Observer:
    """Polls the cluster (nodes and replicas) through the dashboard's HTTP APIs."""

    def __init__(self, dashboard_url: str, app: str):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        self.url = dashboard_url
        self.app = app
        self.client = ServeSubmissionClient(dashboard_url)
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict[str, Any]:
        from ray.util.state import list_nodes

        t = time.time()
        nodes: dict[str, str] = {}
        for n in list_nodes(
            address=self.url, detail=True, limit=1000, raise_on_missing_output=False
        ):
            if n.state != "ALIVE":
                continue
            resources = n.resources_total or {}
            nodes[n.node_id] = "head" if n.is_head_node else pool_of_node(resources)
        details = self.client.get_serve_details()
        deployments: dict[str, Any] = {}
        app = (details.get("applications") or {}).get(self.app) or {}
        for name, d in (app.get("deployments") or {}).items():
            deployments[name] = {
                "status": d.get("status"),
                "replicas": [
                    {
                        "id": r.get("replica_id"),
                        "state": r.get("state"),
                        "node": r.get("node_id"),
                        "pool": nodes.get(r.get("node_id") or "", "?"),
                    }
                    for r in d.get("replicas") or []
                ],
            }
        pools: dict[str, int] = {}
        for group in nodes.values():
            pools[group] = pools.get(group, 0) + 1
        return {
            "t": t,
            "app_status": app.get("status"),
            "pools": pools,
            "nodes": {k: v for k, v in nodes.items() if v != "head"},
            "deployments": deployments,
        }

    def poll(self, period_s: float = 0.5) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.snapshot())
            except Exception as e:  # a slow dashboard: note it, keep polling
                self.samples.append({"t": time.time(), "error": repr(e)[:200]})
            self._stop.wait(period_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def running(sample: Mapping[str, Any], deployment: str) -> list[dict[str, Any]]:
    d = (sample.get("deployments") or {}).get(deployment) or {}
    return [r for r in d.get("replicas") or [] if r.get("state") == "RUNNING"]


def all_replicas(sample: Mapping[str, Any], deployment: str) -> list[dict[str, Any]]:
    d = (sample.get("deployments") or {}).get(deployment) or {}
    return list(d.get("replicas") or [])


# --- load -----------------------------------------------------------------------------


async def _timed_chat(client: Any, plan: LoadPlan, content: str, max_tokens: int) -> dict[str, Any]:
    """One chat request of the load to ``plan``'s model: when it was sent and ended, and its
    status (or the transport error)."""
    t0 = time.time()
    body = {
        "model": plan.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
    }
    try:
        r = await client.post("/v1/chat/completions", json=body)
        status: Any = r.status_code
    except Exception as e:
        status = repr(e)[:100]
    return {"deployment": plan.deployment, "t0": t0, "t1": time.time(), "status": status}


async def _load(
    base_url: str, plans: list[LoadPlan], duration_s: float, max_tokens: int, max_requests: int
) -> list[dict[str, Any]]:
    """Closed-loop clients per plan for ``duration_s`` (and at most ``max_requests``)."""
    import httpx

    results: list[dict[str, Any]] = []
    sent = 0
    t_end = time.time() + duration_s
    total = sum(p.concurrency for p in plans)
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=300.0) as client:

        async def worker(plan: LoadPlan, i: int) -> None:
            nonlocal sent
            while time.time() < t_end and sent < max_requests:
                sent += 1
                results.append(await _timed_chat(client, plan, f"load step {i} {sent}", max_tokens))

        await asyncio.gather(*(worker(p, i) for p in plans for i in range(p.concurrency)))
    return results


def route_models(trace: Trace, plans: list[LoadPlan]) -> dict[str, LoadPlan]:
    """The load plan (deployment, model) each route of ``trace`` sends chat completions to:
    a route that names one model deployment (``LLM``, or ``chat`` for the LLM)."""
    from .cost_inputs import CostInputError, resolve_route

    by_name = {p.deployment: p for p in plans}
    out = {}
    for route in trace.arrivals:
        targets = resolve_route(route, list(by_name))
        if len(targets) != 1 or targets[0] not in by_name:
            raise CostInputError(
                f"the lane replays chat completions to one model deployment per route; "
                f"{route!r} -> {targets}; model deployments: {sorted(by_name)}"
            )
        out[route] = by_name[targets[0]]
    return out


# Seconds one chat request (256 tokens) is expected to take per model service under the
# step, on a shared 2-core box: the step's rate is its clients / this (Little's law). The
# Detector's smoke VL engine batches 8 and answers in ~5 s: at 16 s it gets too few
# requests to scale, at 8 s (1.5 req/s) one replica overflows its queue (503) while the
# second starts (measured: BENCHMARKS.md "cost_check").
STEP_LATENCY_S = {"Detector": 12.0}


def step_trace(
    plans: list[LoadPlan], load_s: int, latency_s: float, per_deployment: Mapping[str, float]
) -> Trace:
    """A load step: for ``load_s`` seconds, each plan's deployment gets
    ``concurrency / latency`` requests a second (Little's law: that many requests are
    ongoing when one takes ``latency``: ``per_deployment``'s, else ``latency_s``), then
    nothing."""
    arrivals = {}
    for p in plans:
        rate = p.concurrency / per_deployment.get(p.deployment, latency_s)
        counts = [math.floor(rate * (k + 1)) - math.floor(rate * k) for k in range(load_s)]
        arrivals[p.deployment] = counts
    return Trace(f"step {load_s} s", load_s, arrivals)


async def _replay(
    base_url: str, trace: Trace, routes: Mapping[str, LoadPlan], max_tokens: int
) -> list[dict[str, Any]]:
    """Open-loop: each second's requests of each route, spread evenly over that second."""
    import httpx

    results: list[dict[str, Any]] = []
    schedule = sorted(
        (k + i / n, route)
        for route, counts in trace.arrivals.items()
        for k, n in enumerate(counts)
        for i in range(n)
    )
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600.0) as client:

        async def one(plan: LoadPlan, i: int) -> None:
            results.append(await _timed_chat(client, plan, f"trace request {i}", max_tokens))

        start = time.time()
        tasks = []
        for i, (offset, route) in enumerate(schedule):
            delay = start + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(routes[route], i)))
        await asyncio.gather(*tasks)
    return results


# --- logs -----------------------------------------------------------------------------

_CONTROLLER_LINE = re.compile(r"\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) controller \d+ -- (.*)")
_LOG_TS = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) ")
_MONITOR_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\s+INFO \S+ -- (.*)")


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def serve_decisions(logs: Path) -> list[tuple[float, str, str]]:
    """(time, deployment, 'Upscaling ...'/'Downscaling ...') from the controller log."""
    out = []
    for path in sorted((logs / "serve").glob("controller_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            m = _CONTROLLER_LINE.match(line)
            if not m or not re.match(r"(Upscaling|Downscaling)", m.group(2)):
                continue
            dm = re.search(r"name='([^']+)'", m.group(2))
            out.append((_ts(m.group(1)), dm.group(1) if dm else "?", m.group(2)[:160]))
    return out


def autoscaler_launches(logs: Path) -> list[tuple[float, str]]:
    """(time, message) of the autoscaler's 'Queue N new nodes for launch' lines."""
    path = logs / "monitor.log"
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = _MONITOR_LINE.match(line)
            if m and "new nodes for launch" in m.group(2):
                out.append((_ts(m.group(1)), m.group(2)[:160]))
    return out


_ACCESS = re.compile(r"\b(?:OK|ERROR) (\d+(?:\.\d+)?)ms")


def replica_durations(logs: Path, app: str, deployment: str, since: float) -> list[float]:
    """Seconds each request (after ``since``) spent in a replica of ``deployment``: its
    replicas' access-log lines (``CALL invoke OK 1234.5ms``)."""
    out = []
    for path in (logs / "serve").glob(f"replica_{app}_{deployment}_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            m, ts = _ACCESS.search(line), _LOG_TS.match(line)
            if m and ts and _ts(ts.group(1)) >= since:
                out.append(float(m.group(1)) / 1000)
    return out


def first_served(logs: Path, app: str, deployment: str, replica_id: str) -> float | None:
    """When a replica finished its first request (its own access log line), or None."""
    for path in (logs / "serve").glob(f"replica_{app}_{deployment}_{replica_id}*.log"):
        for line in path.read_text(errors="replace").splitlines():
            m = _LOG_TS.match(line)
            if m and re.search(r"\b(OK|ERROR)\b \d+(\.\d+)?ms", line):
                return _ts(m.group(1))
    return None


# --- the scenario -----------------------------------------------------------------------


def run(
    prod_config: Mapping[str, Any],
    *,
    cloud: Cloud = "gke",
    load_s: float = 60.0,
    max_tokens: int = 256,
    scale_by: int = 1,
    headroom: float = 1.5,
    deploy_timeout_s: float = 420.0,
    settle_timeout_s: float = 300.0,
    workdir: Path | None = None,
    replay: bool = False,
    trace: Trace | None = None,
    latency_s: float = 16.0,
) -> dict[str, Any]:
    """Start the fake cluster, deploy, load step, observe the way back; return a report.

    The load is closed-loop clients (:func:`load_plans`), or with ``replay`` a trace sent
    open-loop (``trace``, default :func:`step_trace` with ``latency_s``); a replayed trace
    is also simulated by :mod:`cluster.cost` and the two timelines compared (the report's
    ``check``, :mod:`cluster.sim_check`)."""
    from serve_apps.engines.smoke import smoke_llm_path, smoke_sam_checkpoint, smoke_vl_path

    from .fake_cluster import FakeCluster, cluster_groups

    workdir = workdir or Path(tempfile.mkdtemp(prefix="serve-apps-sim-"))
    # Ray reads its auth settings once, when first imported: set them before that.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(workdir / "auth_token")
    os.environ.pop("RAY_ADDRESS", None)
    if "ray" in sys.modules:
        raise RuntimeError("run() must start before Ray is imported (python -m cluster.simulate)")
    cache_dir = workdir / "model-cache"
    # Build once, shared by every fake node (like the PVC on a cluster).
    smoke_llm_path(cache_dir)
    smoke_vl_path(cache_dir)
    smoke_sam_checkpoint(cache_dir)
    groups = cluster_groups(prod_config, cloud)
    env = {"SERVE_APPS_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    cluster = FakeCluster(workdir, groups, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, env=env)
    sim = simulation_config(prod_config, cluster.http_port, str(cache_dir))
    app_name = sim["applications"][0]["name"]
    plans = load_plans(sim, scale_by, headroom)
    if replay and trace is None:
        trace = step_trace(plans, round(load_s), latency_s, STEP_LATENCY_S)
    routes = route_models(trace, plans) if replay and trace is not None else None
    pool_of = {d.name: g.pool.name for g in groups for d in g.deployments}
    min_nodes = {g.pool.name: g.min_nodes for g in groups}
    bounds = {d.name: (d.min_replicas, d.max_replicas) for g in groups for d in g.deployments}
    report: dict[str, Any] = {
        "cloud": cloud,
        "settings": {
            "serve_autoscaling": FAST_AUTOSCALING,
            "autoscaler": {
                "version": "v1 (fake_multinode)",
                "AUTOSCALER_UPDATE_INTERVAL_S": 1,
                "idle_timeout_s": IDLE_TIMEOUT_MINUTES * 60,
            },
            "load_s": load_s,
            "max_tokens": max_tokens,
            "headroom": headroom,
            "plans": [p.__dict__ for p in plans],
            "trace": (
                {"name": trace.name, "duration_s": trace.duration_s, "arrivals": trace.arrivals}
                if routes is not None and trace is not None
                else None
            ),
        },
        "pool_of": pool_of,
        "bounds": bounds,
        "min_nodes": min_nodes,
        "max_nodes": {g.pool.name: g.max_nodes for g in groups},
    }
    observer: Observer | None = None
    try:
        cluster.start()
        for k, v in cluster.client_env().items():  # the address is known now
            os.environ[k] = v
        observer = Observer(cluster.dashboard_url, app_name)
        t_deploy = time.time()
        _deploy(observer, sim, deploy_timeout_s)
        report["deploy_s"] = time.time() - t_deploy
        baseline = _settle_baseline(observer, bounds, min_nodes, settle_timeout_s)
        report["baseline"] = baseline
        base_ids = {name: {r["id"] for r in all_replicas(baseline, name)} for name in bounds}
        observer.start()
        t0 = time.time()
        url = f"http://127.0.0.1:{cluster.http_port}"
        if routes is not None and trace is not None:
            results = asyncio.run(_replay(url, trace, routes, max_tokens))
            t_load_end = t0 + trace.duration_s
        else:
            results = asyncio.run(_load(url, plans, load_s, max_tokens, 20000))
            t_load_end = time.time()
        _wait_back(observer, bounds, min_nodes, settle_timeout_s)
        observer.stop()
        report.update(
            _analyse(observer.samples, results, cluster.logs, app_name, base_ids, t0, t_load_end)
        )
        if routes is not None and trace is not None:
            durations = {
                name: replica_durations(cluster.logs, app_name, name, t0) for name in bounds
            }
            report["check"] = simulator_check(
                sim, cloud, trace, observer.samples, results, base_ids, t0, t_load_end, durations
            )
    finally:
        if observer is not None:
            observer.stop()
        cluster.stop()
    return report


def simulator_check(
    sim_config: Mapping[str, Any],
    cloud: Cloud,
    trace: Trace,
    samples: list[dict[str, Any]],
    results: list[dict[str, Any]],
    base_ids: Mapping[str, set[str]],
    t0: float,
    t_load_end: float,
    durations: Mapping[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Simulate ``trace`` with :mod:`cluster.cost` under the lane's Serve config (its fast
    autoscaling settings included) and its node idle timeout, with the timings the lane
    measured; compare replica and node timelines (:func:`cluster.sim_check.compare`)."""
    from .cost import kuberay_cluster, serve_deployments, simulate_kuberay
    from .cost_inputs import load_prices
    from .sim_check import calibrate, compare, lane_timelines

    good = [s for s in samples if "error" not in s]
    duration = max(trace.duration_s, math.ceil(good[-1]["t"] - t0) + 1)
    inputs = calibrate(samples, results, base_ids, durations)
    deployments = serve_deployments(sim_config, inputs["service_s"], inputs["replica_start_s"])
    names = [d.name for d in deployments]
    groups = kuberay_cluster(sim_config, cloud, IDLE_TIMEOUT_MINUTES * 60, inputs["node_start_s"])
    padded = Trace(
        trace.name,
        duration,
        {r: [*v, *[0] * (duration - len(v))] for r, v in trace.arrivals.items()},
    )
    result = simulate_kuberay(deployments, groups, padded, load_prices())
    sim_replicas = {line.name: line.timeline for line in result.lines if line.name in names}
    pools = sorted(set(result.nodes))
    real_replicas, real_nodes = lane_timelines(samples, t0, duration, names, pools)
    check = compare(real_replicas, sim_replicas, real_nodes, result.nodes, round(t_load_end - t0))
    check["inputs"] = inputs
    check["timelines"] = {
        "lane": {"replicas": real_replicas, "nodes": real_nodes},
        "sim": {"replicas": sim_replicas, "nodes": result.nodes},
    }
    return check


def _deploy(observer: Observer, config: Mapping[str, Any], timeout_s: float) -> None:
    observer.client.deploy_applications(dict(config))
    deadline = time.time() + timeout_s
    last: Any = None
    while time.time() < deadline:
        try:
            last = observer.snapshot()
            if last.get("app_status") == "RUNNING":
                return
        except Exception as e:
            last = repr(e)
        time.sleep(2)
    raise TimeoutError(f"the app did not reach RUNNING in {timeout_s:.0f} s; last: {last}")


def _at_minimum(
    sample: Mapping[str, Any], bounds: Mapping[str, Any], min_nodes: Mapping[str, int]
) -> bool:
    for name, (lo, _) in bounds.items():
        reps = all_replicas(sample, name)
        if len(reps) != lo or len(running(sample, name)) != lo:
            return False
    pools = sample.get("pools") or {}
    return all(pools.get(p, 0) == n for p, n in min_nodes.items())


def _settle_baseline(
    observer: Observer, bounds: Mapping[str, Any], min_nodes: Mapping[str, int], timeout_s: float
) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    sample = observer.snapshot()
    while time.time() < deadline and not _at_minimum(sample, bounds, min_nodes):
        time.sleep(1)
        sample = observer.snapshot()
    return sample


def _wait_back(
    observer: Observer, bounds: Mapping[str, Any], min_nodes: Mapping[str, int], timeout_s: float
) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(1)
        if observer.samples and _at_minimum(observer.samples[-1], bounds, min_nodes):
            time.sleep(2)  # a couple more samples at the minimum
            return


def _analyse(
    samples: list[dict[str, Any]],
    results: list[dict[str, Any]],
    logs: Path,
    app: str,
    base_ids: Mapping[str, set[str]],
    t0: float,
    t_load_end: float,
) -> dict[str, Any]:
    good = [s for s in samples if "error" not in s]
    per: dict[str, Any] = {}
    decisions = serve_decisions(logs)
    launches = autoscaler_launches(logs)
    for name, ids in base_ids.items():
        new_ids: list[str] = []
        placements: dict[str, str] = {}
        peak = 0
        t_running_more = None
        for s in good:
            reps = all_replicas(s, name)
            for r in reps:
                if r["id"] and r["id"] not in ids and r["id"] not in new_ids:
                    new_ids.append(r["id"])
                if r["id"] and r.get("pool") not in (None, "?"):
                    placements[r["id"]] = r["pool"]
            n_run = len(running(s, name))
            peak = max(peak, n_run)
            if t_running_more is None and n_run > len(ids) and s["t"] >= t0:
                t_running_more = s["t"]
        served = [first_served(logs, app, name, rid) for rid in new_ids]
        served_t = sorted(t for t in served if t is not None)
        ok = sorted(r["t1"] for r in results if r["deployment"] == name and r["status"] == 200)
        up = [t for t, d, msg in decisions if d == name and msg.startswith("Upscaling") and t >= t0]
        down = [
            t for t, d, msg in decisions if d == name and msg.startswith("Downscaling") and t >= t0
        ]
        # None when the deployment was already back at its minimum when the load ended
        # (it never scaled, or scaled down during the load: see downscales_during_load).
        after = [s for s in good if s["t"] >= t_load_end]
        t_back = None
        if after and len(all_replicas(after[0], name)) != len(ids):
            t_back = next((s["t"] for s in after if len(all_replicas(s, name)) == len(ids)), None)
        per[name] = {
            "baseline_replicas": len(ids),
            "peak_running": peak,
            "new_replicas": new_ids,
            "placements": placements,
            "final_replicas": len(all_replicas(good[-1], name)) if good else None,
            "requests": sum(1 for r in results if r["deployment"] == name),
            "ok": len(ok),
            "errors": sorted(
                {
                    str(r["status"])
                    for r in results
                    if r["deployment"] == name and r["status"] != 200
                }
            ),
            "upscale_decision_s": up[0] - t0 if up else None,
            "extra_replica_running_s": t_running_more - t0 if t_running_more else None,
            "extra_replica_serving_s": served_t[0] - t0 if served_t else None,
            "first_ok_s": ok[0] - t0 if ok else None,
            "downscale_decision_after_load_s": (
                min(t for t in down if t >= t_load_end) - t_load_end
                if any(t >= t_load_end for t in down)
                else None
            ),
            "replicas_back_after_load_s": t_back - t_load_end if t_back else None,
            "downscales_during_load": sum(1 for t in down if t < t_load_end),
        }
    pools: dict[str, Any] = {}
    names = sorted({p for s in good for p in (s.get("pools") or {})})
    for p in names:
        counts = [(s["t"], (s.get("pools") or {}).get(p, 0)) for s in good]
        base = counts[0][1] if counts else 0
        peak = max(c for _, c in counts) if counts else 0
        t_more = next((t for t, c in counts if c > base and t >= t0), None)
        after_counts = [(t, c) for t, c in counts if t >= t_load_end]
        t_back = None
        if after_counts and after_counts[0][1] != base:
            t_back = next((t for t, c in after_counts if c == base), None)
        pools[p] = {
            "baseline_nodes": base,
            "peak_nodes": peak,
            "final_nodes": counts[-1][1] if counts else None,
            "node_added_s": t_more - t0 if t_more else None,
            "nodes_back_after_load_s": t_back - t_load_end if t_back else None,
        }
    return {
        "load_duration_s": t_load_end - t0,
        "deployments": per,
        "pools": pools,
        "autoscaler_launches": [(t - t0, msg) for t, msg in launches if t >= t0 - 5],
        "serve_decisions": [(t - t0, d, msg) for t, d, msg in decisions if t >= t0 - 5],
        "samples": len(good),
        "poll_errors": len(samples) - len(good),
    }


def main(argv: list[str] | None = None) -> int:
    from .render import PROD_CONFIG, load_config

    parser = argparse.ArgumentParser(prog="python -m cluster.simulate")
    parser.add_argument("--config", type=Path, default=PROD_CONFIG)
    parser.add_argument("--cloud", choices=["gke", "eks"], default="gke")
    parser.add_argument("--load-s", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--scale-by", type=int, default=1)
    parser.add_argument("--headroom", type=float, default=1.5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--replay",
        action="store_true",
        help="send a trace open-loop and compare with python -m cluster cost's simulation",
    )
    parser.add_argument("--trace", type=Path, help="with --replay: CSV timestamp,route,count")
    parser.add_argument(
        "--latency-s",
        type=float,
        default=16.0,
        help="with --replay and no --trace: the step's rate is the clients / this latency "
        f"(except {STEP_LATENCY_S})",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    trace = None
    if args.trace:
        from .cost_inputs import ROUTES, load_trace_csv

        names = [d["name"] for app in config["applications"] for d in app.get("deployments") or []]
        trace = load_trace_csv(args.trace, [*ROUTES, *names])
    report = run(
        config,
        cloud=args.cloud,
        load_s=args.load_s,
        max_tokens=args.max_tokens,
        scale_by=args.scale_by,
        headroom=args.headroom,
        workdir=args.workdir,
        replay=args.replay or trace is not None,
        trace=trace,
        latency_s=args.latency_s,
    )
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k in ("deployments", "pools")}, indent=1))
    if "check" in report:
        from .sim_check import format_check

        print("lane vs python -m cluster cost (same trace, config, settings):")
        print(format_check(report["check"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
