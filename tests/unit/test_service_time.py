"""serve_apps.service_time: the replica's own service time of a request, and how a batched
engine's steps are split across the requests in them."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_apps.engines.base import GenerationRequest, SamplingParams
from serve_apps.pipelines.vision import _service_times, _total_service
from serve_apps.service_time import ServiceClock, ServiceShare, StepTimer


class Row:
    def __init__(self) -> None:
        self.share = ServiceShare()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_is_split_equally_across_its_rows():
    wall, cpu = FakeClock(), FakeClock()
    a, b, c = Row(), Row(), Row()
    # step 1: a prefill of a and b, 0.4 s wall, 0.2 s CPU
    timer = StepTimer(wall, cpu)
    wall.now, cpu.now = 0.4, 0.2
    assert timer.split([a, b]) == pytest.approx((0.4, 0.2))
    # step 2: a decode step of a, b and c (c joined), 0.3 s wall, 0.6 s CPU
    timer = StepTimer(wall, cpu)
    wall.now, cpu.now = 0.7, 0.8
    timer.split([a, b, c])
    assert a.share.wall_s == pytest.approx(0.2 + 0.1) and a.share.cpu_s == pytest.approx(0.3)
    assert c.share.wall_s == pytest.approx(0.1) and c.share.cpu_s == pytest.approx(0.2)
    # the shares add up to the engine's busy time
    total = sum(r.share.wall_s for r in (a, b, c))
    assert total == pytest.approx(0.7)
    assert sum(r.share.cpu_s for r in (a, b, c)) == pytest.approx(0.8)
    StepTimer(wall, cpu).split([])  # a step of no rows charges nobody


def test_wall_and_cpu_time_of_a_request():
    clock = ServiceClock()
    time.sleep(0.05)  # wall time, no CPU
    t_end = time.process_time() + 0.05
    while time.process_time() < t_end:  # CPU time
        pass
    t = clock.timings()
    assert set(t) == {"service", "service_cpu"}
    assert t["service"] >= 50  # at least the sleep, in ms
    assert t["service_cpu"] >= 50  # at least the busy loop


def test_an_engine_wait_counts_as_the_requests_share():
    clock = ServiceClock()
    time.sleep(0.2)  # waiting on a batched engine ...
    clock.engine(0.2, 0.0, [ServiceShare(0.03, 0.01), ServiceShare(0.02, 0.01)])
    t = clock.timings()  # ... of which its two rows' steps were 50 ms
    assert 50 <= t["service"] < 150
    unshared = ServiceClock()
    time.sleep(0.05)
    unshared.engine(0.05, 0.0, [None])  # an engine that reports no share: the whole wait
    assert unshared.timings()["service"] >= 50


def test_pipelines_copy_only_what_the_replica_sent():
    timings: dict[str, float] = {}
    _service_times(timings, "detect", {"generate": 3.0, "service": 5.0, "service_cpu": 4.0})
    _service_times(timings, "segment", {"encode": 1.0})  # an older replica: nothing sent
    assert timings == {"detect_service": 5.0, "detect_service_cpu": 4.0}


def test_a_route_service_is_the_sum_of_its_calls():
    timings = {
        "detect_service": 5.0,
        "detect_service_cpu": 4.0,
        "segment_service": 2.0,
        "segment_service_cpu": 1.5,
        "phrases": 0.5,
        "total": 30.0,
    }
    _total_service(timings, timings["phrases"])
    assert timings["service"] == 7.5 and timings["service_cpu"] == 5.5
    nothing: dict[str, float] = {"total": 1.0}
    _total_service(nothing)
    assert nothing == {"total": 1.0}


async def test_the_transformers_engine_reports_each_requests_share(smoke_engine):
    def request(i: int, n: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=f"share {i}", sampling=SamplingParams(max_tokens=n, temperature=0.0)
        )

    t0 = time.perf_counter()
    outs = await asyncio.gather(
        *(smoke_engine.generate_full(request(i, 8 + 8 * i)) for i in range(4))
    )
    elapsed = time.perf_counter() - t0
    shares = [o.service for o in outs]
    assert all(isinstance(s, ServiceShare) and s.wall_s > 0 and s.cpu_s >= 0 for s in shares)
    # Split shares of shared steps: together no more than the engine was busy.
    assert sum(s.wall_s for s in shares if s) <= elapsed
    # Streaming: the share rides on the last output only.
    stream = [o async for o in smoke_engine.generate(request(9, 6))]
    assert stream[-1].service is not None and all(o.service is None for o in stream[:-1])
