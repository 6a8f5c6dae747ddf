"""Targets of the HTTP contract suite. ``CONTRACT_TARGETS`` (comma-separated) picks them.

- ``inprocess``: ``create_app`` with ``LocalHandle``s over the real servers (smoke models);
- ``ray``: the same app deployed with real Ray Serve, over real HTTP;
- ``modal``: the Modal app (``modal_adapter/app.py``) executed locally: its ``Ingress``
  class's ASGI app under a test client, calling the generated classes with ``.local()``;
- ``vllm``, ``vllm-ray``: the same app on the vLLM backend (opt-in lane: scripts/test-vllm).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from tests.conftest import CONTRACT_ARGS, CONTRACT_HEADERS, VLLM_CONTRACT_ARGS

DEFAULT_TARGETS = "inprocess,ray,modal"
TARGETS = [t for t in os.environ.get("CONTRACT_TARGETS", DEFAULT_TARGETS).split(",") if t]
# Targets on the vLLM backend carry the `vllm` mark (skipped where vLLM is not installed).
PARAMS = [pytest.param(t, marks=pytest.mark.vllm) if "vllm" in t else t for t in TARGETS]


async def _inprocess_app(raw_args):
    from serve_apps.handles import LocalHandle
    from serve_apps.ingress import create_app
    from serve_apps.registry import AppArgs, create_servers

    args = AppArgs.model_validate(raw_args)
    servers = create_servers(args)
    # One after another: first imports of transformers' lazy modules are not thread-safe.
    for server in servers.values():
        await server.start()
    return create_app(args, {k: LocalHandle(v) for k, v in servers.items()}), servers


class ContractClient(httpx.AsyncClient):
    """An httpx client for one target; ``args`` are the ``AppArgs`` the target serves. It
    sends the contract's API key (auth is on in the contract app); ``transport`` is kept
    for other clients of the same target (the ``openai`` client)."""

    def __init__(self, args: dict[str, Any], **kwargs: Any):
        super().__init__(timeout=120, headers=CONTRACT_HEADERS, **kwargs)
        self.args = args
        self.transport_given = kwargs.get("transport")


@pytest.fixture(scope="session", params=PARAMS)
async def api(request):
    """A :class:`ContractClient` whose base URL is the contract app on one target."""
    args = VLLM_CONTRACT_ARGS if "vllm" in request.param else CONTRACT_ARGS
    if request.param in ("inprocess", "vllm"):
        app, servers = await _inprocess_app(args)
        transport = httpx.ASGITransport(app=app)
        async with ContractClient(args, transport=transport, base_url="http://inprocess") as c:
            yield c
        for server in servers.values():
            await server.shutdown()
    elif request.param in ("ray", "vllm-ray"):
        url = request.getfixturevalue(
            "ray_serve_url" if request.param == "ray" else "vllm_ray_serve_url"
        )
        async with ContractClient(args, base_url=url) as c:
            yield c
    elif request.param == "modal":
        module = request.getfixturevalue("modal_contract_app")
        transport = httpx.ASGITransport(app=module.Ingress().web.local())
        async with ContractClient(args, transport=transport, base_url="http://modal") as c:
            yield c
        for _, host in module.CLASSES.values():
            await host.shutdown_all()
    else:
        raise pytest.UsageError(f"unknown contract target {request.param!r}")


@pytest.fixture(scope="session")
def modal_contract_app(tmp_path_factory):
    """modal_adapter/app.py for config.yaml's deployments with the contract's args (dev)."""
    import yaml

    from serve_apps.registry import INGRESS, AppArgs
    from tests.conftest import REPO, load_modal_app

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    app = config["applications"][0]
    app["args"] = CONTRACT_ARGS
    # Only the deployments these args build (config.yaml's batch runner is off here).
    built = {s.name for s, _ in AppArgs.model_validate(CONTRACT_ARGS).enabled()} | {INGRESS}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in built]
    path = tmp_path_factory.mktemp("modal") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_modal_app(path, "dev", "modal_app_contract")
