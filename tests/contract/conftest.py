"""Targets of the HTTP contract suite. ``CONTRACT_TARGETS`` (comma-separated) picks them.

- ``inprocess``: ``create_app`` with ``LocalHandle``s over the real servers (smoke models);
- ``ray``: the same app deployed with real Ray Serve, over real HTTP.
"""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import CONTRACT_ARGS

DEFAULT_TARGETS = "inprocess,ray"
TARGETS = [t for t in os.environ.get("CONTRACT_TARGETS", DEFAULT_TARGETS).split(",") if t]


async def _inprocess_app():
    from serve_apps.config import AppArgs
    from serve_apps.handles import LocalHandle
    from serve_apps.ingress import create_app
    from serve_apps.servers import create_servers

    args = AppArgs.model_validate(CONTRACT_ARGS)
    servers = create_servers(args)
    for server in servers.values():
        await server.start()
    return create_app(args, {k: LocalHandle(v) for k, v in servers.items()}), servers


@pytest.fixture(scope="session", params=TARGETS)
async def api(request):
    """An httpx client whose base URL is the contract app on one target."""
    if request.param == "inprocess":
        app, servers = await _inprocess_app()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://inprocess", timeout=120
        ) as c:
            yield c
        for server in servers.values():
            await server.shutdown()
    elif request.param == "ray":
        url = request.getfixturevalue("ray_serve_url")
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            yield c
    else:
        raise pytest.UsageError(f"unknown contract target {request.param!r}")
