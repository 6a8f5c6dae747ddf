"""serve_apps.service_time: the replica's own service time of a request."""

from __future__ import annotations

import time

from serve_apps.pipelines.vision import _service_times
from serve_apps.service_time import ServiceClock


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


def test_pipelines_copy_only_what_the_replica_sent():
    timings: dict[str, float] = {}
    _service_times(timings, "detect", {"generate": 3.0, "service": 5.0, "service_cpu": 4.0})
    _service_times(timings, "segment", {"encode": 1.0})  # an older replica: nothing sent
    assert timings == {"detect_service": 5.0, "detect_service_cpu": 4.0}
