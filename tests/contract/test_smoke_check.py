"""The smoke-test script (serve_apps/smoke_check.py) on every contract target: it calls
every route the app's OpenAPI document lists, and each passes."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from serve_apps import smoke_check


async def test_every_route_passes_the_smoke_test(api):
    rows = await smoke_check.run(api)
    table = smoke_check.table(rows)
    assert rows and all(r.ok for r in rows), table
    called = {(r.method, r.path) for r in rows}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/segment")} <= called
    assert called <= set(smoke_check.REQUESTS)
    assert table.endswith(f"{len(rows)}/{len(rows)} routes passed")


async def test_a_route_without_a_smoke_request_and_a_failing_route_fail_the_table():
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": []}

    @app.post("/v1/new-route")
    def new_route() -> dict:
        return {}

    @app.post("/v1/ground")
    def ground() -> dict:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        rows = {r.path: r for r in await smoke_check.run(client)}
    assert rows["/health"].ok and rows["/v1/models"].ok
    assert not rows["/v1/new-route"].ok and "no smoke request" in rows["/v1/new-route"].detail
    assert not rows["/v1/ground"].ok and rows["/v1/ground"].status == 500
    assert "2/4 routes passed" in smoke_check.table(list(rows.values()))
