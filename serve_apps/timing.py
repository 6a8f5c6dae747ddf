"""Stage timings: the one helper every ``timings_ms`` breakdown uses."""

from __future__ import annotations

import time


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading), rounded to microseconds."""
    return round((time.perf_counter() - t0) * 1000, 3)
