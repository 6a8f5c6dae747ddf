"""Service time per request (serve_apps.service_time) on the targets whose replicas record
into the ingress's registry: after one request of each route, every service's
``serve_apps_service_seconds`` moved, by plausible amounts, and the vision responses carry
theirs in ``timings_ms``.

On Ray the replicas' metrics go to Ray's metrics agent (``ray_serve_apps_service_seconds``
on each node's exporter), which this suite does not scrape.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import b64, scene_png
from tests.unit.test_front_door import scrape

IMAGE = scene_png(160, 120, seed=11)
NAME = "serve_apps_service_seconds"


@pytest.fixture(autouse=True)
def _scrapable(api, request):
    target = request.node.callspec.params.get("api")
    if target not in ("inprocess", "modal"):
        pytest.skip(f"{target}: the replicas' metrics are not in the ingress's /metrics")
    if api.args.get("detector") is None:
        pytest.skip("this target serves no vision services")


async def test_every_service_records_its_service_time(api):
    before = (await api.get("/metrics")).text
    calls = [
        (
            "LLM",
            "/v1/chat/completions",
            {
                "model": "smoke-llm",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8,
            },
        ),
        (
            "Codegen",
            "/v1/generate",
            {"prompt": "x", "constraints": {"regex": "[ab]{3}"}, "max_tokens": 8},
        ),
        ("Detector", "/v1/detect", {"image": b64(IMAGE), "categories": ["person"]}),
        ("SAM", "/v1/segment", {"image": b64(IMAGE), "boxes": [[10, 10, 80, 60]]}),
        ("Grounder", "/v1/ground", {"image": b64(IMAGE), "caption": "a man and two dogs"}),
    ]
    elapsed = 0.0
    bodies = {}
    for service, path, body in calls:
        t0 = time.perf_counter()
        r = await api.post(path, json=body)
        elapsed += time.perf_counter() - t0
        assert r.status_code == 200, (path, r.text)
        bodies[service] = r.json()
    after = (await api.get("/metrics")).text
    for service, _, _ in calls:
        for clock in ("wall", "cpu"):
            labels = {"service": service, "clock": clock}
            count = scrape(after, f"{NAME}_count", **labels) - scrape(
                before, f"{NAME}_count", **labels
            )
            assert count >= 1, (service, clock)
        wall = scrape(after, f"{NAME}_sum", service=service, clock="wall") - scrape(
            before, f"{NAME}_sum", service=service, clock="wall"
        )
        # Something, and no more than all the requests took end to end.
        assert 0 < wall <= elapsed, (service, wall, elapsed)
    # The vision routes: each call's service time, and their sum, inside the request's time.
    for service in ("Detector", "SAM", "Grounder"):
        timings = bodies[service]["timings_ms"]
        assert 0 < timings["service"] <= timings["total"], (service, timings)
        assert timings["service_cpu"] >= 0
    ground = bodies["Grounder"]["timings_ms"]
    assert ground["service"] >= ground.get("detect_service", 0) + ground.get("segment_service", 0)
