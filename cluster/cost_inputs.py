"""The cost model's inputs: the price table and the load trace, parsed with clear errors.

- :func:`load_prices` reads ``cluster/prices.yaml`` (or another file of that shape): the
  per-second price of every Modal GPU the pools name, of Modal CPU and memory, and of
  every node type of every pool (``cluster/pools.py``) on every cloud, with its sources
  and date. A missing node type, a price that is not a positive number, or a missing
  source or date is a :class:`CostInputError` naming the entry.
- :func:`parse_trace_csv` reads a load trace: a CSV with the header
  ``timestamp,route,count`` (timestamp in seconds or ISO 8601; rows in any order); a bad
  row is an error with its line number.
- :func:`builtin_trace` makes the built-in shapes (:data:`SHAPES`): ``steady``,
  ``diurnal``, ``bursty``, ``nightly-batch``, one day at a given mean rate.

A *route* is what a request asks for: an API route (:data:`ROUTES`: ``chat`` goes to the
LLM, ``ground`` to the Grounder, the Detector and SAM) or a deployment name (``LLM``).
Standard library and PyYAML only.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from .pools import CLOUDS, POOLS, Cloud

PRICES_FILE = Path(__file__).with_name("prices.yaml")
DAY_S = 86400

# An API route -> the deployments one request of it uses (besides the Ingress).
ROUTES: dict[str, tuple[str, ...]] = {
    "chat": ("LLM",),
    "generate": ("Codegen",),
    "detect": ("Detector",),
    "segment": ("SAM",),  # with boxes; with categories it is `detect` + `segment`
    "ground": ("Grounder", "Detector", "SAM"),
}
# The built-in traces' route mix (shares of requests).
DEFAULT_MIX: dict[str, float] = {
    "chat": 0.5,
    "generate": 0.2,
    "detect": 0.1,
    "segment": 0.1,
    "ground": 0.1,
}


class CostInputError(ValueError):
    """A price table or a trace that cannot be used (the message says where and why)."""


# --- prices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prices:
    """USD per second."""

    date: str
    sources: Mapping[str, str]
    modal_gpu: Mapping[str, float]
    modal_cpu_core: float
    modal_memory_gib: float
    nodes: Mapping[Cloud, Mapping[str, float]]
    cluster: Mapping[Cloud, float]

    def node(self, cloud: Cloud, instance_type: str) -> float:
        return self.nodes[cloud][instance_type]

    def with_node_discount(self, share: float) -> Prices:
        """Every node ``share`` cheaper (spot: about 0.6; committed use: 0.37-0.55)."""
        if not 0 <= share < 1:
            raise CostInputError(f"--node-discount: a share in [0, 1), got {share!r}")
        nodes = {c: {k: v * (1 - share) for k, v in t.items()} for c, t in self.nodes.items()}
        return dataclasses.replace(self, nodes=nodes)


def _price(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CostInputError(f"{where}: a price is a number (USD per second), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise CostInputError(f"{where}: a price is a finite number >= 0, got {value!r}")
    return float(value)


def _section(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, Mapping):
        raise CostInputError(f"{where}{key}: missing (a mapping)")
    return value


def parse_prices(text: str, source: str = "<prices>") -> Prices:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CostInputError(f"{source}: not YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise CostInputError(f"{source}: a price table is a mapping")
    where = f"{source}: "
    raw_date = data.get("date")
    try:
        day = date.fromisoformat(str(raw_date)) if raw_date is not None else None
    except ValueError:
        day = None
    if day is None:
        raise CostInputError(f"{where}date: give the date the prices were read (YYYY-MM-DD)")
    if data.get("currency", "USD") != "USD":
        raise CostInputError(f"{where}currency: only USD, got {data.get('currency')!r}")
    sources = _section(data, "sources", where)
    for key in ("modal", *CLOUDS):
        if not str(sources.get(key) or "").strip():
            raise CostInputError(f"{where}sources.{key}: say where the {key} prices come from")
    modal = _section(data, "modal", where)
    gpus = _section(modal, "gpu", f"{where}modal.")
    modal_gpu = {str(k): _price(v, f"{where}modal.gpu.{k}") for k, v in gpus.items()}
    for pool in POOLS:
        for name in filter(None, (pool.modal_gpu, *pool.modal_gpu_fallbacks)):
            if name not in modal_gpu:
                raise CostInputError(
                    f"{where}modal.gpu.{name}: missing (pool {pool.name} uses it on Modal)"
                )
    cpu = _price(modal.get("cpu_core"), f"{where}modal.cpu_core")
    memory = _price(modal.get("memory_gib"), f"{where}modal.memory_gib")
    node_data = _section(data, "nodes", where)
    cluster_data = _section(data, "cluster", where)
    nodes: dict[Cloud, dict[str, float]] = {}
    cluster: dict[Cloud, float] = {}
    for cloud in CLOUDS:
        table = _section(node_data, cloud, f"{where}nodes.")
        nodes[cloud] = {str(k): _price(v, f"{where}nodes.{cloud}.{k}") for k, v in table.items()}
        for pool in POOLS:
            instance = pool.shape(cloud).instance_type
            if instance not in nodes[cloud]:
                raise CostInputError(
                    f"{where}nodes.{cloud}.{instance}: missing (the {pool.name} pool's node "
                    f"on {cloud}, cluster/pools.py)"
                )
        cluster[cloud] = _price(cluster_data.get(cloud), f"{where}cluster.{cloud}")
    return Prices(
        date=day.isoformat(),
        sources={str(k): str(v) for k, v in sources.items()},
        modal_gpu=modal_gpu,
        modal_cpu_core=cpu,
        modal_memory_gib=memory,
        nodes=nodes,
        cluster=cluster,
    )


def load_prices(path: Path | None = None) -> Prices:
    path = path or PRICES_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise CostInputError(f"{path}: cannot read the price table ({e.strerror})") from e
    return parse_prices(text, str(path))


# --- traces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Requests arriving per second, per route; ``duration_s`` seconds long."""

    name: str
    duration_s: int
    arrivals: Mapping[str, Sequence[int]]  # route -> count per second

    @property
    def total(self) -> int:
        return sum(sum(v) for v in self.arrivals.values())

    @property
    def mean_rps(self) -> float:
        return self.total / self.duration_s

    def scaled(self, factor: float) -> Trace:
        """The same shape with ``factor`` times the requests (cumulative rounding)."""
        return Trace(
            f"{self.name} x{factor:g}",
            self.duration_s,
            {r: _integerize([c * factor for c in v]) for r, v in self.arrivals.items()},
        )


def resolve_route(route: str, deployments: Sequence[str]) -> tuple[str, ...]:
    """The deployments one request of ``route`` uses (an API route or a deployment name)."""
    if route in ROUTES:
        return ROUTES[route]
    if route in deployments:
        return (route,)
    known = sorted(ROUTES) + sorted(deployments)
    close = difflib.get_close_matches(route, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise CostInputError(f"unknown route {route!r}{hint}; routes: {', '.join(known)}")


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(
            f"timestamp {text!r} is neither seconds nor ISO 8601 (2026-01-01T00:00:00Z)"
        ) from None


def parse_trace_csv(
    text: str, routes: Sequence[str] | None = None, name: str = "csv", duration_s: int | None = None
) -> Trace:
    """A trace from CSV text ``timestamp,route,count``. ``routes``: the names a route may
    take (default: :data:`ROUTES`). The trace lasts until the last row's second (or
    ``duration_s``); timestamps are relative to the first row."""
    allowed = set(routes if routes is not None else ROUTES)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["timestamp", "route", "count"]:
        raise CostInputError(f"{name}: line 1: the header must be timestamp,route,count")
    rows: list[tuple[float, str, int]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{name}: line {line_no}"
        if len(row) != 3:
            raise CostInputError(f"{where}: 3 fields (timestamp,route,count), got {len(row)}")
        ts_text, route, count_text = (c.strip() for c in row)
        try:
            ts = _timestamp(ts_text)
        except ValueError as e:
            raise CostInputError(f"{where}: {e}") from None
        if not math.isfinite(ts):
            raise CostInputError(f"{where}: timestamp {ts_text!r} is not finite")
        if route not in allowed:
            close = difflib.get_close_matches(route, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CostInputError(
                f"{where}: unknown route {route!r}{hint}; routes: {', '.join(sorted(allowed))}"
            )
        try:
            count = int(count_text)
        except ValueError:
            raise CostInputError(f"{where}: count {count_text!r} is not a whole number") from None
        if count < 0:
            raise CostInputError(f"{where}: count {count} is negative")
        rows.append((ts, route, count))
    if not rows:
        raise CostInputError(f"{name}: no rows after the header")
    t0 = min(r[0] for r in rows)
    last = max(int(r[0] - t0) for r in rows)
    length = duration_s if duration_s is not None else last + 1
    if length <= last:
        raise CostInputError(f"{name}: rows reach second {last}, past duration {length}")
    arrivals: dict[str, list[int]] = {}
    for ts, route, count in rows:
        arrivals.setdefault(route, [0] * length)[int(ts - t0)] += count
    return Trace(name, length, arrivals)


def load_trace_csv(path: Path, routes: Sequence[str] | None = None) -> Trace:
    try:
        text = path.read_text()
    except OSError as e:
        raise CostInputError(f"{path}: cannot read the trace ({e.strerror})") from e
    return parse_trace_csv(text, routes, name=str(path))


def parse_seconds(
    items: Sequence[str], flag: str, names: Sequence[str] | None = None, positive: bool = False
) -> dict[str, float]:
    """``NAME=SECONDS`` options (``--service-time LLM=3.2``) as a dict; ``names``: the
    names allowed (default: any); seconds must be >= 0 (> 0 with ``positive``)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        ok = seconds > 0 if positive else seconds >= 0
        if not sep or not name or not ok or not math.isfinite(seconds):
            bound = "> 0" if positive else ">= 0"
            raise CostInputError(f"{flag} {item!r}: give NAME=SECONDS ({bound})")
        if names is not None and name not in names:
            raise CostInputError(f"{flag}: no {name!r}; one of: {', '.join(names)}")
        out[name] = seconds
    return out


def _integerize(rates: Sequence[float]) -> list[int]:
    """Whole requests per second whose running sum follows the running sum of ``rates``."""
    out, total, sent = [], 0.0, 0
    for r in rates:
        total += r
        n = math.floor(total + 1e-9) - sent
        out.append(n)
        sent += n
    return out


def _shape(shape: str, t: int) -> float:
    """The rate at second ``t`` of the day, relative to the day's mean (mean 1)."""
    hour = (t % DAY_S) / 3600
    if shape == "steady":
        return 1.0
    if shape == "diurnal":  # 1.9x the mean at 15:00, 0.1x at 03:00
        return 1.0 + 0.9 * math.sin(2 * math.pi * (hour - 9) / 24)
    if shape == "bursty":  # 15-minute bursts every 4 hours carry 80% of the requests
        in_burst = (t % (4 * 3600)) < 15 * 60
        burst_share = 15 * 60 / (4 * 3600)  # 1/16 of the time
        return 0.8 / burst_share if in_burst else 0.2 / (1 - burst_share)
    if shape == "nightly-batch":  # the whole day's requests between 02:00 and 03:00
        return 24.0 if 2 <= hour < 3 else 0.0
    raise CostInputError(f"unknown trace shape {shape!r}; shapes: {', '.join(SHAPES)}")


SHAPES = ("steady", "diurnal", "bursty", "nightly-batch")


def builtin_trace(
    shape: str,
    mean_rps: float,
    mix: Mapping[str, float] | None = None,
    duration_s: int = DAY_S,
) -> Trace:
    """One of :data:`SHAPES` at ``mean_rps`` requests per second on average, split over the
    routes by ``mix`` (default :data:`DEFAULT_MIX`)."""
    if shape not in SHAPES:
        raise CostInputError(f"unknown trace shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if not (mean_rps > 0 and math.isfinite(mean_rps)):
        raise CostInputError(f"the mean rate is a number > 0, got {mean_rps!r}")
    mix = dict(mix or DEFAULT_MIX)
    total = sum(mix.values())
    if not mix or total <= 0 or any(w < 0 for w in mix.values()):
        raise CostInputError(f"a route mix has weights >= 0 that sum to > 0, got {mix}")
    rel = [_shape(shape, t) for t in range(duration_s)]
    arrivals = {
        route: _integerize([mean_rps * w / total * x for x in rel])
        for route, w in mix.items()
        if w > 0
    }
    return Trace(f"{shape} @ {mean_rps:g} req/s", duration_s, arrivals)


def parse_mix(text: str) -> dict[str, float]:
    """``chat=0.6,generate=0.4`` -> a route mix."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        route, sep, weight = part.partition("=")
        try:
            mix[route.strip()] = float(weight) if sep else float("nan")
        except ValueError:
            mix[route.strip()] = float("nan")
        if not math.isfinite(mix[route.strip()]) or mix[route.strip()] < 0:
            raise CostInputError(f"--mix: {part!r} is not route=weight (a weight >= 0)")
    if not mix:
        raise CostInputError("--mix: give route=weight pairs, e.g. chat=0.7,generate=0.3")
    return mix
