"""Service time: how long one request held a replica, measured inside the replica.

The cost model (``python -m cluster cost``) charges each request a slot of its replica
for a *service time*; this is the number it stands for, measured around the server
method: ``service`` is the wall-clock milliseconds from the method's start to its result
(the slot held; under batching, concurrent requests overlap in it), ``service_cpu`` the
process CPU milliseconds spent meanwhile (all threads of the process, so concurrent
requests' work is included: exact for one request at a time). Accelerator time (CUDA
events) is not measured here.

One small value per request, in the result's ``timings_ms``: a metrics exporter can read
the same :class:`ServiceClock`.
"""

from __future__ import annotations

import time


class ServiceClock:
    """Started when a request enters the server method; :meth:`timings` when it leaves."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def timings(self) -> dict[str, float]:
        return {
            "service": round((time.perf_counter() - self.wall0) * 1000, 3),
            "service_cpu": round((time.process_time() - self.cpu0) * 1000, 3),
        }
