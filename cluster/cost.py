"""What a Serve config costs under a load trace, on KubeRay (GKE, EKS) and on Modal.

``python -m cluster cost`` (see :mod:`cluster.__main__`) reads a Serve config, a trace
(:mod:`cluster.cost_inputs`) and a price table, and steps one-second ticks through the
trace for each target, simulating its autoscaling the way that target implements it:

**Ray Serve on KubeRay** (:func:`simulate_kuberay`). Per deployment, Serve's default
policy: every tick the deployment's ongoing requests (running + queued at the handles)
are averaged over ``look_back_period_s``; the desired count is
``ceil(average / target_ongoing_requests)`` within ``[min_replicas, max_replicas]``. A
higher count is applied once it has been wanted for ``upscale_delay_s`` consecutive
seconds, a lower one after ``downscale_delay_s`` (from 1 to 0: after
``downscale_to_zero_delay_s``, default ``downscale_delay_s``); a deployment at zero with
a request waiting gets one replica at once. Replicas are placed on whole nodes of their
pool (:mod:`cluster.placement`: the same per-replica resources and node shapes the
RayService is rendered from): first fit on a node that is up or starting, else a new node
(``node_start_s``); a replica serves ``replica_start_s`` after its node is up. A node with
no replica is removed after KubeRay's idle timeout (the rendered
``idleTimeoutSeconds``) unless the group is at its ``minReplicas``. Paid: every node from
its request to its removal, the head node and the managed control plane.

**Modal** (:func:`simulate_modal`), per class of the Modal plan
(:func:`modal_adapter.plan.make_plan`, so overrides and packed classes count): the
desired count is ``ceil(inputs / target_inputs)`` within ``[min_containers,
max_containers]``, started at once (ready after the cold start); inputs fill the oldest
containers first, and a container with no input for ``scaledown_window`` seconds stops
(never below ``min_containers``). Paid: every container second (starting ones too), its
GPUs, its CPU cores and its memory.

Requests: each one holds a slot of one replica/container (``max_ongoing_requests`` /
``max_inputs`` slots each) for its service time (:data:`ASSUMPTIONS`, or measured ones
with ``--service-time``), first come first served; a request that finds no free slot
waits. The waits are what cold starts and scale-up delays cost in latency (p95 reported).
Rejections (``max_queued_requests``) are not modelled: every request waits its turn.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cost_inputs import DAY_S, Prices, Trace, resolve_route
from .pools import CPU_POOL, POOLS, Cloud, Pool

MONTH_DAYS = 30


@dataclass(frozen=True)
class ServiceAssumption:
    """What the simulator assumes of one deployment at production size (seconds, GiB)."""

    service_s: float  # how long one request holds a slot (at a full batch)
    replica_start_s: float  # process start to ready: model load from the cache volume
    memory_gib: float  # host memory a Modal container is billed for


# Production-size guesses (A100, bf16, weights on the model-cache volume), to be replaced by
# measured service times (`--service-time LLM=3.2`, bench/service_time.py for the method).
ASSUMPTIONS: dict[str, ServiceAssumption] = {
    "Ingress": ServiceAssumption(service_s=0.01, replica_start_s=5, memory_gib=1),
    "LLM": ServiceAssumption(service_s=4.0, replica_start_s=90, memory_gib=32),
    "Codegen": ServiceAssumption(service_s=20.0, replica_start_s=180, memory_gib=80),
    "Detector": ServiceAssumption(service_s=3.0, replica_start_s=60, memory_gib=16),
    "SAM": ServiceAssumption(service_s=0.5, replica_start_s=20, memory_gib=8),
    "Grounder": ServiceAssumption(service_s=0.02, replica_start_s=10, memory_gib=1),
}
DEFAULT_ASSUMPTION = ServiceAssumption(service_s=1.0, replica_start_s=30, memory_gib=4)
# From the node request to a Ray worker pod that has joined: VM boot, image pull (CUDA
# images are large), Ray start.
NODE_START_S = {"gpu": 300.0, "cpu": 90.0}
MODAL_DEFAULT_CPU = 0.125  # Modal's minimum reservation when `cpu=` is not set


# --- the request side, shared by both targets ---------------------------------------------


@dataclass
class Work:
    """One replica (container) type's requests: a FIFO queue and the slots in use."""

    service_s: Mapping[str, float]  # service -> seconds per request
    slots: int  # per replica/container
    queue: deque[list[Any]] = field(default_factory=deque)  # [arrival t, service, count]
    done_at: list[tuple[float, int]] = field(default_factory=list)  # heap (end, count)
    in_flight: int = 0
    waits: list[tuple[int, int]] = field(default_factory=list)  # (wait s, count)
    requests: int = 0
    queued: int = 0

    def tick(self, t: int, arrivals: Mapping[str, Sequence[int]], ready: int) -> None:
        while self.done_at and self.done_at[0][0] <= t + 1e-9:
            self.in_flight -= heapq.heappop(self.done_at)[1]
        for service, counts in arrivals.items():
            n = counts[t]
            if n:
                self.queue.append([t, service, n])
                self.requests += n
                self.queued += n
        if not self.queue:
            return
        free = ready * self.slots - self.in_flight
        while free > 0 and self.queue:
            item = self.queue[0]
            n = min(free, item[2])
            heapq.heappush(self.done_at, (t + self.service_s[item[1]], n))
            self.waits.append((t - item[0], n))
            self.in_flight += n
            self.queued -= n
            free -= n
            item[2] -= n
            if item[2] == 0:
                self.queue.popleft()

    def ongoing(self) -> int:
        return self.in_flight + self.queued


def unit_arrivals(trace: Trace, host: Mapping[str, str]) -> dict[str, dict[str, list[int]]]:
    """Per unit (deployment/class), per service it hosts: requests arriving each second.
    ``host``: service -> unit. Every request also passes the ``Ingress`` once."""
    names = list(host)
    out: dict[str, dict[str, list[int]]] = {u: {} for u in host.values()}
    for route, counts in trace.arrivals.items():
        for service in resolve_route(route, names):
            if service in host:
                row = out[host[service]].setdefault(service, [0] * trace.duration_s)
                for t, c in enumerate(counts):
                    row[t] += c
    if "Ingress" in host:
        total = [0] * trace.duration_s
        for counts in trace.arrivals.values():
            for t, c in enumerate(counts):
                total[t] += c
        out[host["Ingress"]]["Ingress"] = total
    return out


def percentile(waits: Sequence[tuple[int, int]], q: float) -> float:
    """The ``q`` quantile (0..1) of weighted samples ``(value, count)``; 0 when empty."""
    total = sum(n for _, n in waits)
    if total == 0:
        return 0.0
    rank = math.ceil(q * total)
    seen = 0
    for value, n in sorted(waits):
        seen += n
        if seen >= rank:
            return float(value)
    return float(max(v for v, _ in waits))


# --- results ------------------------------------------------------------------------------


@dataclass
class Line:
    """One row of a target's bill: a deployment/class, a pool's spare capacity, or overhead."""

    name: str
    cost: float = 0.0  # USD over the trace
    idle_cost: float = 0.0  # of which paid while nothing ran on it
    requests: int = 0
    waits: list[tuple[int, int]] = field(default_factory=list)
    timeline: list[int] = field(default_factory=list)  # replicas/containers/nodes per tick

    @property
    def idle_share(self) -> float:
        return self.idle_cost / self.cost if self.cost else 0.0


@dataclass
class TargetResult:
    target: str  # "kuberay-gke", "kuberay-eks", "modal"
    duration_s: int
    lines: list[Line]
    nodes: dict[str, list[int]] = field(default_factory=dict)  # pool -> nodes per tick
    cost_timeline: list[float] = field(default_factory=list)  # USD per second, per tick

    @property
    def cost(self) -> float:
        return sum(line.cost for line in self.lines)

    @property
    def idle_share(self) -> float:
        return sum(line.idle_cost for line in self.lines) / self.cost if self.cost else 0.0

    @property
    def per_day(self) -> float:
        return self.cost * DAY_S / self.duration_s

    def per_1k(self, requests: int) -> float | None:
        return self.cost / requests * 1000 if requests else None

    def waits(self) -> list[tuple[int, int]]:
        return [w for line in self.lines for w in line.waits]


# --- KubeRay --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeDeployment:
    """One Serve deployment as the simulator sees it."""

    name: str
    pool: Pool
    resources: Mapping[str, float]  # per replica: CPU, GPU
    min_replicas: int
    max_replicas: int
    initial_replicas: int
    target_ongoing_requests: float
    max_ongoing_requests: int
    look_back_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    service_s: float = 1.0
    replica_start_s: float = 30.0


class ServeAutoscaler:
    """Ray Serve's default replica policy for one deployment, ticked once per second."""

    def __init__(self, d: ServeDeployment):
        self.d = d
        self.target = d.initial_replicas
        self.window = max(1, round(d.look_back_s))
        self.samples: deque[int] = deque()
        self.total = 0
        self.counter = 0  # > 0: seconds wanting more; < 0: seconds wanting fewer

    def desired(self) -> int:
        avg = self.total / len(self.samples)
        want = math.ceil(avg / self.d.target_ongoing_requests - 1e-9)
        return min(self.d.max_replicas, max(self.d.min_replicas, want))

    def tick(self, ongoing: int) -> int:
        """Record this second's ongoing requests; return the target replica count."""
        d = self.d
        self.samples.append(ongoing)
        self.total += ongoing
        if len(self.samples) > self.window:
            self.total -= self.samples.popleft()
        if self.target == 0 and ongoing > 0:  # a request waits at zero: one replica now
            self.target, self.counter = 1, 0
            return self.target
        want = self.desired()
        if want > self.target:
            self.counter = max(self.counter, 0) + 1
            if self.counter >= d.upscale_delay_s:
                self.target, self.counter = want, 0
        elif want < self.target:
            self.counter = min(self.counter, 0) - 1
            delay = d.downscale_delay_s
            if want == 0 and self.target == 1 and d.downscale_to_zero_delay_s is not None:
                delay = d.downscale_to_zero_delay_s
            if -self.counter >= delay:
                self.target, self.counter = want, 0
        else:
            self.counter = 0
        return self.target


@dataclass
class _Node:
    pool: Pool
    free: dict[str, float]
    ready_at: float
    replicas: int = 0
    idle_since: float | None = None


@dataclass
class _Replica:
    node: _Node
    ready_at: float


@dataclass(frozen=True)
class KubeRayCluster:
    """The cluster side: node shapes per pool, bounds, timings."""

    cloud: Cloud
    min_nodes: Mapping[str, int]  # pool -> the worker group's minReplicas
    max_nodes: Mapping[str, int]
    idle_timeout_s: float = 300.0
    node_start_s: Mapping[str, float] = field(default_factory=dict)  # pool -> seconds
    head_instance: str | None = None  # the head pod's node (a CPU-pool machine)


def _node_capacity(pool: Pool, cloud: Cloud) -> dict[str, float]:
    shape = pool.shape(cloud)
    return {"CPU": float(shape.pod_cpus), "GPU": float(shape.gpus)}


def _fits(free: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def simulate_kuberay(
    deployments: Sequence[ServeDeployment],
    cluster: KubeRayCluster,
    trace: Trace,
    prices: Prices,
) -> TargetResult:
    """One tick per second of ``trace``: Serve's autoscaler, then the node autoscaler."""
    cloud = cluster.cloud
    names = [d.name for d in deployments]
    pools = {d.pool.name: d.pool for d in deployments}
    nodes: dict[str, list[_Node]] = {p: [] for p in pools}
    replicas: dict[str, list[_Replica]] = {d.name: [] for d in deployments}
    scalers = {d.name: ServeAutoscaler(d) for d in deployments}
    work = {
        d.name: Work({d.name: d.service_s}, max(1, d.max_ongoing_requests)) for d in deployments
    }
    node_price = {p: prices.node(cloud, pools[p].shape(cloud).instance_type) for p in pools}
    lines = {d.name: Line(d.name) for d in deployments}
    spare = {p: Line(f"{p} (unused node capacity)") for p in pools}
    overhead = Line("head node + control plane")
    overhead_rate = prices.cluster[cloud]
    if cluster.head_instance is not None:
        overhead_rate += prices.node(cloud, cluster.head_instance)
    result = TargetResult(f"kuberay-{cloud}", trace.duration_s, [])
    share_key = {p: ("GPU" if pools[p].is_gpu else "CPU") for p in pools}
    by_pool = {p: [d for d in deployments if d.pool.name == p] for p in pools}

    def new_node(pool: Pool, t: float, ready_at: float) -> _Node:
        node = _Node(pool, _node_capacity(pool, cloud), ready_at, idle_since=t)
        nodes[pool.name].append(node)
        return node

    def place(d: ServeDeployment, t: float) -> bool:
        candidates = [n for n in nodes[d.pool.name] if _fits(n.free, d.resources)]
        if candidates:
            node = candidates[0]
        elif len(nodes[d.pool.name]) < cluster.max_nodes.get(d.pool.name, 0):
            start = cluster.node_start_s.get(d.pool.name, 0.0)
            node = new_node(d.pool, t, t + start)
        else:
            return False
        for k, v in d.resources.items():
            node.free[k] = node.free.get(k, 0.0) - v
        node.replicas += 1
        node.idle_since = None
        replicas[d.name].append(_Replica(node, max(t, node.ready_at) + d.replica_start_s))
        return True

    def remove(d: ServeDeployment, t: float) -> None:
        reps = replicas[d.name]
        starting = [r for r in reps if r.ready_at > t]
        victim = starting[-1] if starting else min(reps, key=lambda r: r.node.replicas)
        reps.remove(victim)
        for k, v in d.resources.items():
            victim.node.free[k] = victim.node.free.get(k, 0.0) + v
        victim.node.replicas -= 1
        if victim.node.replicas == 0:
            victim.node.idle_since = t

    # Steady state at t=0: the initial replicas on nodes that are up, the minimum nodes.
    for d in deployments:
        for _ in range(d.initial_replicas):
            if place(d, -1e9):
                replicas[d.name][-1].ready_at = 0.0
    for p, n in cluster.min_nodes.items():
        while p in pools and len(nodes[p]) < n:
            new_node(pools[p], 0.0, 0.0)
    for node_list in nodes.values():
        for node in node_list:
            node.ready_at = 0.0
            if node.replicas == 0:
                node.idle_since = 0.0

    pending: dict[str, int] = {d.name: 0 for d in deployments}
    arrivals = unit_arrivals(trace, {n: n for n in names})
    share = {
        d.name: d.resources.get(share_key[d.pool.name], 0.0)
        / _node_capacity(d.pool, cloud)[share_key[d.pool.name]]
        * node_price[d.pool.name]
        for d in deployments
    }
    ready_now: dict[str, int] = {}
    for t in range(trace.duration_s):
        for d in deployments:
            reps = replicas[d.name]
            ready = sum(1 for r in reps if r.ready_at <= t)
            ready_now[d.name] = ready
            w = work[d.name]
            w.tick(t, arrivals[d.name], ready)
            want = scalers[d.name].tick(w.ongoing())
            have = len(reps) + pending[d.name]
            for _ in range(have, want):
                pending[d.name] += 1
            for _ in range(want, have):
                if pending[d.name]:
                    pending[d.name] -= 1
                else:
                    remove(d, t)
            while pending[d.name] and place(d, t):
                pending[d.name] -= 1
        # The node autoscaler: idle nodes past the timeout go, down to the group minimum.
        for p, node_list in nodes.items():
            for node in list(node_list):
                if (
                    node.replicas == 0
                    and node.idle_since is not None
                    and t - node.idle_since >= cluster.idle_timeout_s
                    and len(node_list) > cluster.min_nodes.get(p, 0)
                ):
                    node_list.remove(node)
        # The bill for this second.
        tick_cost = overhead_rate
        overhead.cost += overhead_rate
        for p, node_list in nodes.items():
            paid = len(node_list) * node_price[p]
            tick_cost += paid
            used = 0.0
            for d in by_pool[p]:
                n = len(replicas[d.name])
                busy = min(ready_now[d.name], work[d.name].in_flight)
                lines[d.name].cost += share[d.name] * n
                lines[d.name].idle_cost += share[d.name] * (n - busy)
                used += share[d.name] * n
            spare[p].cost += paid - used
            spare[p].idle_cost += paid - used
            result.nodes.setdefault(p, []).append(len(node_list))
        for d in deployments:
            lines[d.name].timeline.append(len(replicas[d.name]))
        result.cost_timeline.append(tick_cost)
    for d in deployments:
        lines[d.name].requests = work[d.name].requests
        lines[d.name].waits = work[d.name].waits
    result.lines = [*lines.values(), *spare.values(), overhead]
    return result


# --- Modal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalClass:
    """One Modal class as the simulator sees it (one or several packed services)."""

    name: str
    services: Mapping[str, float]  # deployment name -> service seconds per request
    gpu: str | None  # Modal GPU name (first choice), None for CPU
    gpu_count: int
    cpu: float
    memory_gib: float
    min_containers: int
    max_containers: int
    scaledown_window: float
    max_inputs: int
    target_inputs: int | None
    cold_start_s: float


def modal_price(c: ModalClass, prices: Prices) -> float:
    """USD per second of one container of ``c``."""
    gpu = prices.modal_gpu[c.gpu] * c.gpu_count if c.gpu else 0.0
    return gpu + c.cpu * prices.modal_cpu_core + c.memory_gib * prices.modal_memory_gib


@dataclass
class _Container:
    ready_at: float
    idle_since: float


def simulate_modal(classes: Sequence[ModalClass], trace: Trace, prices: Prices) -> TargetResult:
    host = {s: c.name for c in classes for s in c.services}
    arrivals = unit_arrivals(trace, host)
    work = {c.name: Work(dict(c.services), max(1, c.max_inputs)) for c in classes}
    containers: dict[str, list[_Container]] = {
        c.name: [_Container(0.0, 0.0) for _ in range(c.min_containers)] for c in classes
    }
    lines = {c.name: Line(c.name) for c in classes}
    price = {c.name: modal_price(c, prices) for c in classes}
    result = TargetResult("modal", trace.duration_s, [])
    for t in range(trace.duration_s):
        tick_cost = 0.0
        for c in classes:
            conts = containers[c.name]
            w = work[c.name]
            ready = [x for x in conts if x.ready_at <= t]
            w.tick(t, arrivals[c.name], len(ready))
            per = c.target_inputs or c.max_inputs
            want = min(c.max_containers, max(c.min_containers, math.ceil(w.ongoing() / per)))
            for _ in range(len(conts), want):
                conts.append(_Container(t + c.cold_start_s, t + c.cold_start_s))
            # Inputs fill the oldest ready containers first; the rest are idle.
            busy = math.ceil(w.in_flight / per) if w.in_flight else 0
            for i, x in enumerate(ready):
                if i < busy:
                    x.idle_since = t + 1
            for x in list(reversed(conts)):
                if (
                    len(conts) > max(c.min_containers, want)
                    and x.ready_at <= t
                    and t - x.idle_since >= c.scaledown_window
                ):
                    conts.remove(x)
            n_busy = min(busy, sum(1 for x in conts if x.ready_at <= t))
            lines[c.name].cost += price[c.name] * len(conts)
            lines[c.name].idle_cost += price[c.name] * (len(conts) - n_busy)
            lines[c.name].timeline.append(len(conts))
            tick_cost += price[c.name] * len(conts)
        result.cost_timeline.append(tick_cost)
    for c in classes:
        lines[c.name].requests = work[c.name].requests
        lines[c.name].waits = work[c.name].waits
    result.lines = list(lines.values())
    return result


# --- from a Serve config ------------------------------------------------------------------


def _assumption(
    name: str, service_s: Mapping[str, float], replica_start_s: Mapping[str, float] | None = None
) -> ServiceAssumption:
    """:data:`ASSUMPTIONS` for deployment ``name``, with measured values where given."""
    base = ASSUMPTIONS.get(name, DEFAULT_ASSUMPTION)
    starts = replica_start_s or {}
    return ServiceAssumption(
        service_s.get(name, base.service_s),
        starts.get(name, base.replica_start_s),
        base.memory_gib,
    )


def serve_deployments(
    config: Mapping[str, Any],
    service_s: Mapping[str, float] | None = None,
    replica_start_s: Mapping[str, float] | None = None,
) -> list[ServeDeployment]:
    """Every deployment of the config's (one) application, with Serve's defaults.
    ``service_s`` / ``replica_start_s``: measured seconds per deployment name, in place of
    :data:`ASSUMPTIONS`."""
    from ray.serve.config import AutoscalingConfig

    from .pools import pool_for_options
    from .serve_config import resolve_deployments

    overrides = dict(service_s or {})
    out = []
    for d in resolve_deployments(config).deployments:
        scaling = AutoscalingConfig(**dict(d.autoscaling or {}))
        a = _assumption(d.name, overrides, replica_start_s)
        fixed = d.autoscaling is None
        initial = d.min_replicas if fixed else (scaling.initial_replicas or d.min_replicas)
        resources = {k: v for k, v in d.resources.items() if k in ("CPU", "GPU")}
        out.append(
            ServeDeployment(
                name=d.name,
                pool=pool_for_options(d.ray_actor_options),
                resources=resources,
                min_replicas=d.min_replicas,
                max_replicas=d.max_replicas,
                initial_replicas=initial,
                target_ongoing_requests=float(scaling.target_ongoing_requests or 2),
                max_ongoing_requests=int(d.max_ongoing_requests or 5),
                look_back_s=scaling.look_back_period_s,
                upscale_delay_s=0 if fixed else scaling.upscale_delay_s,
                downscale_delay_s=math.inf if fixed else scaling.downscale_delay_s,
                downscale_to_zero_delay_s=scaling.downscale_to_zero_delay_s,
                service_s=a.service_s,
                replica_start_s=a.replica_start_s,
            )
        )
    return out


def kuberay_cluster(
    config: Mapping[str, Any],
    cloud: Cloud,
    idle_timeout_s: float | None = None,
    node_start_s: Mapping[str, float] | None = None,
) -> KubeRayCluster:
    """The worker groups' bounds as rendered (:func:`cluster.render.preflight`).
    ``idle_timeout_s`` (default: the rendered ``idleTimeoutSeconds``) and ``node_start_s``
    (pool name -> seconds; default :data:`NODE_START_S`) replace the assumed timings."""
    from .render import AUTOSCALER_IDLE_TIMEOUT_S, preflight

    groups, _ = preflight(config, cloud)
    starts = {p.name: NODE_START_S["gpu" if p.is_gpu else "cpu"] for p in POOLS}
    starts.update(node_start_s or {})
    idle = AUTOSCALER_IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s
    return KubeRayCluster(
        cloud=cloud,
        min_nodes={g.pool.name: g.min_nodes for g in groups},
        max_nodes={g.pool.name: g.max_nodes for g in groups},
        idle_timeout_s=float(idle),
        node_start_s=starts,
        head_instance=CPU_POOL.shape(cloud).instance_type,
    )


def modal_classes(
    config: Mapping[str, Any], service_s: Mapping[str, float] | None = None
) -> list[ModalClass]:
    """The classes ``modal_adapter`` would deploy for ``config`` in prod mode."""
    from modal_adapter.plan import make_plan

    overrides = dict(service_s or {})
    plan = make_plan(dict(config), "prod", "cost", "<config>")
    out = []
    for c in plan.classes:
        hosted = [s.name for s in c.servers] or [c.name]
        gpu = c.gpu[0] if isinstance(c.gpu, list) else c.gpu
        count = 1
        if gpu and ":" in gpu:
            gpu, n = gpu.split(":", 1)
            count = int(n)
        assumptions = [_assumption(s, overrides) for s in hosted]
        out.append(
            ModalClass(
                name=c.name,
                services={s: a.service_s for s, a in zip(hosted, assumptions, strict=True)},
                gpu=gpu,
                gpu_count=count if gpu else 0,
                cpu=c.cpu if c.cpu is not None else MODAL_DEFAULT_CPU,
                memory_gib=(
                    c.memory_mib / 1024 if c.memory_mib else sum(a.memory_gib for a in assumptions)
                ),
                min_containers=c.min_containers,
                max_containers=c.max_containers,
                scaledown_window=float(c.scaledown_window),
                max_inputs=c.max_inputs,
                target_inputs=c.target_inputs,
                # A Modal container is up in seconds; the model load dominates.
                cold_start_s=max(a.replica_start_s for a in assumptions) + 5,
            )
        )
    return out


# --- the report ---------------------------------------------------------------------------


@dataclass
class Comparison:
    trace: Trace
    results: list[TargetResult]

    def cheapest(self) -> TargetResult:
        return min(self.results, key=lambda r: r.cost)


def run_all(
    config: Mapping[str, Any],
    trace: Trace,
    prices: Prices,
    service_s: Mapping[str, float] | None = None,
    clouds: Sequence[Cloud] = ("gke", "eks"),
) -> Comparison:
    deployments = serve_deployments(config, service_s)
    classes = modal_classes(config, service_s)
    results = [
        simulate_kuberay(deployments, kuberay_cluster(config, cloud), trace, prices)
        for cloud in clouds
    ]
    results.append(simulate_modal(classes, trace, prices))
    return Comparison(trace, results)


def _money(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:,.2f}" if abs(x) >= 0.1 or x == 0 else f"${x:.4f}"


def format_report(cmp: Comparison) -> str:
    trace = cmp.trace
    out = [
        f"trace: {trace.name}: {trace.total:,} requests over {trace.duration_s:,} s "
        f"(mean {trace.mean_rps:.3g} req/s)",
    ]
    header = (
        f"  {'':34s} {'per day':>11s} {'per month':>12s} {'idle':>6s} {'per 1k req':>11s} "
        f"{'p95 wait':>9s}"
    )
    scale = DAY_S / trace.duration_s
    for r in cmp.results:
        out.append(f"{r.target}:")
        out.append(header)
        for line in r.lines:
            day = line.cost * scale
            per_1k = line.cost / line.requests * 1000 if line.requests else None
            wait = f"{percentile(line.waits, 0.95):.0f} s" if line.requests else "-"
            out.append(
                f"  {line.name:34s} {_money(day):>11s} {_money(day * MONTH_DAYS):>12s} "
                f"{line.idle_share:6.0%} {_money(per_1k):>11s} {wait:>9s}"
            )
        out.append(
            f"  {'TOTAL':34s} {_money(r.per_day):>11s} {_money(r.per_day * MONTH_DAYS):>12s} "
            f"{r.idle_share:6.0%} {_money(r.per_1k(trace.total)):>11s} "
            f"{percentile(r.waits(), 0.95):6.0f} s"
        )
    return "\n".join(out)


def recommendation(cmp: Comparison, break_even_rps: Mapping[str, float | None]) -> str:
    """One line: which target is cheaper for this trace, and where that turns."""
    modal = next(r for r in cmp.results if r.target == "modal")
    ray = min((r for r in cmp.results if r.target != "modal"), key=lambda r: r.cost)
    if modal.cost <= ray.cost:
        ratio = ray.cost / modal.cost if modal.cost else math.inf
        line = f"for this trace, Modal is {ratio:.1f}x cheaper than {ray.target}"
    else:
        ratio = modal.cost / ray.cost if ray.cost else math.inf
        line = f"for this trace, {ray.target} is {ratio:.1f}x cheaper than Modal"
    be = break_even_rps.get(ray.target)
    if be is None:
        line += f"; no break-even with {ray.target} between the scaled traces tried"
    else:
        cheaper_above = "KubeRay" if modal.cost <= ray.cost else "Modal"
        if cmp.trace.mean_rps > be:
            cheaper_above = "KubeRay" if modal.cost > ray.cost else "Modal"
        line += f"; {cheaper_above} wins above {be:.3g} requests/s (mean, this trace's shape)"
    return line


def break_even(
    simulate: Any,
    trace: Trace,
    targets: Sequence[str],
    factors: Sequence[float] | None = None,
    refine: int = 3,
) -> dict[str, float | None]:
    """The mean rate (req/s, same shape) where each KubeRay target costs what Modal costs.

    ``simulate(trace) -> list[TargetResult]``. Scales the trace by ``factors`` (a
    geometric grid, x1/16..x256 by default), takes the first sign change of
    (KubeRay - Modal), narrows it ``refine`` times by bisection (geometric mean of the
    bracket) and interpolates linearly in the rate inside the last bracket."""
    cache: dict[float, tuple[float, dict[str, float]]] = {}

    def costs(f: float) -> tuple[float, dict[str, float]] | None:
        if f not in cache:
            scaled = trace.scaled(f)
            if scaled.total == 0:
                return None
            cache[f] = (scaled.mean_rps, {r.target: r.cost for r in simulate(scaled)})
        return cache[f]

    grid = [f for f in (factors or [4.0**k for k in range(-2, 5)]) if costs(f) is not None]
    out: dict[str, float | None] = {}
    for target in targets:

        def diff(f: float, target: str = target) -> tuple[float, float]:
            rps, c = cache[f]
            return rps, c[target] - c["modal"]

        out[target] = None
        for f0, f1 in itertools.pairwise(grid):
            (r0, d0), (r1, d1) = diff(f0), diff(f1)
            if d0 == 0:
                out[target] = r0
                break
            if (d0 < 0) == (d1 < 0):
                continue
            for _ in range(refine):
                mid = math.sqrt(f0 * f1)
                if costs(mid) is None:
                    break
                rm, dm = diff(mid)
                if (dm < 0) == (d0 < 0):
                    f0, r0, d0 = mid, rm, dm
                else:
                    f1, r1, d1 = mid, rm, dm
            out[target] = r0 + (r1 - r0) * d0 / (d0 - d1)
            break
    return out
