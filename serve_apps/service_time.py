"""Service time: how much of a replica one request used, measured inside the replica.

The cost model (``python -m cluster cost``) charges each request a slot of its replica
for a *service time*; this is the number it stands for. Two clocks: ``service`` (wall
seconds) and ``service_cpu`` (process CPU seconds, all threads).

- **A server method** (:class:`ServiceClock`, started when the request enters it): the
  method's wall and CPU time, except that the time it spent waiting on a batched engine
  is replaced by the request's *share* of that engine's steps (below). Without a share
  (an engine that does not report one: vLLM, whose scheduler steps are not exposed here)
  the whole wait counts.
- **A batched engine step** (:class:`StepTimer`, the transformers engine's scheduler):
  each prefill and each decode step is timed (wall, and process CPU during it) and split
  *equally* across the rows in that step: a padded batch computes every row alike (a
  decode step feeds one token per row; a prefill is left-padded to its longest prompt),
  so an equal split is what each row costs the step. A request's share is the sum over
  the steps it was in: the shares of all requests add up to the engine's busy time.

Where it goes: the metric ``serve_apps_service_seconds{service,clock}`` (one sample per
successful request, ``service`` the deployment name), and ``timings_ms`` of the vision
results (``service`` / ``service_cpu``, milliseconds). Accelerator time (CUDA events) is
not measured: on a GPU the wall share is the number to use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import metrics


@dataclass
class ServiceShare:
    """A request's accumulated share of its engine's steps (seconds)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0


class _Row(Protocol):
    share: ServiceShare


class StepTimer:
    """Times one engine step; :meth:`split` charges it equally to the rows in it."""

    def __init__(
        self,
        wall: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
    ):
        self._wall, self._cpu = wall, cpu
        self.wall0, self.cpu0 = wall(), cpu()

    def split(self, rows: Sequence[_Row]) -> tuple[float, float]:
        """Add each row's equal share of the step so far; return (wall, cpu) of the step."""
        wall, cpu = self._wall() - self.wall0, self._cpu() - self.cpu0
        if rows:
            for row in rows:
                row.share.wall_s += wall / len(rows)
                row.share.cpu_s += cpu / len(rows)
        return wall, cpu


class ServiceClock:
    """Started when a request enters a server method; :meth:`finish` when it leaves."""

    def __init__(self, service: str = "") -> None:
        self.service = service
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self._waited = ServiceShare()  # spent waiting on engine calls
        self._share = ServiceShare()  # the request's share of those engines' steps

    def engine(self, wall_s: float, cpu_s: float, shares: Iterable[Any]) -> None:
        """An engine call took ``wall_s`` / ``cpu_s`` of this method; ``shares``: each
        output's ``service`` (:class:`ServiceShare`, None when the engine reports none)."""
        got = list(shares)
        self._waited.wall_s += wall_s
        self._waited.cpu_s += cpu_s
        if got and all(isinstance(s, ServiceShare) for s in got):
            self._share.wall_s += sum(s.wall_s for s in got)
            self._share.cpu_s += sum(s.cpu_s for s in got)
        else:
            self._share.wall_s += wall_s
            self._share.cpu_s += cpu_s

    def seconds(self) -> ServiceShare:
        wall = time.perf_counter() - self.wall0 - self._waited.wall_s + self._share.wall_s
        cpu = time.process_time() - self.cpu0 - self._waited.cpu_s + self._share.cpu_s
        return ServiceShare(max(0.0, wall), max(0.0, cpu))

    def timings(self) -> dict[str, float]:
        """``service`` / ``service_cpu`` in milliseconds (no metric recorded)."""
        s = self.seconds()
        return {"service": round(s.wall_s * 1000, 3), "service_cpu": round(s.cpu_s * 1000, 3)}

    def finish(self) -> dict[str, float]:
        """Record the metric (with this clock's service name) and return :meth:`timings`."""
        s = self.seconds()
        record(self.service, s)
        return {"service": round(s.wall_s * 1000, 3), "service_cpu": round(s.cpu_s * 1000, 3)}


class EngineCall:
    """Times an awaited engine call for a :class:`ServiceClock`::

    call = EngineCall()
    outs = await engine.generate_full(g)
    clock.engine(*call.done(), [o.service for o in outs])
    """

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def record(service: str, seconds: ServiceShare) -> None:
    """One request's service time into ``serve_apps_service_seconds``."""
    metrics.observe(metrics.SERVICE_TIME, seconds.wall_s, service=service, clock="wall")
    metrics.observe(metrics.SERVICE_TIME, seconds.cpu_s, service=service, clock="cpu")
