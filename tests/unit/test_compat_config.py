"""The compat routes' switches (``compat.routes``) and availability, on fake engines."""

import httpx
import pytest
from pydantic import ValidationError

from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.registry import AppArgs
from serve_apps.replicas.llm import LLMServer
from tests.fakes import FakeEngine
from tests.helpers import assert_envelope

BASE = {
    "llm": {"served_model_name": "fake-llm"},
    "codegen": {"served_model_name": "fake-codegen"},
    "detector": None,
    "sam": None,
    "grounder": None,
}


async def app_client(compat):
    args = AppArgs.model_validate({**BASE, "compat": compat})
    servers = {
        k: LLMServer(getattr(args, k), engine=FakeEngine(reply="x y")) for k in ("llm", "codegen")
    }
    for s in servers.values():
        await s.start()
    app = create_app(args, {k: LocalHandle(v) for k, v in servers.items()})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_a_compat_route_is_on_by_default_and_off_when_configured():
    async with await app_client({}) as c:
        r = await c.post("/generate_api", json={"prompt": "p", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["generated_text"] == "x y"
    async with await app_client({"routes": {"/generate_api": False}}) as c:
        r = await c.post("/generate_api", json={"prompt": "p"})
        assert_envelope(r, 404)  # unmounted: the app's own 404


async def test_vl_routes_need_an_image_text_model():
    async with await app_client({}) as c:
        for path in ("/generate_description", "/extract_from_url", "/rex_inference"):
            assert (await c.post(path, json={})).status_code == 404


async def test_compat_errors_carry_success_false():
    async with await app_client({}) as c:
        r = await c.post("/generate_api", json={"prompt": ""})
        assert assert_envelope(r, 400, success=True)["param"] == "prompt"
        assert r.json()["success"] is False
        r = await c.post(
            "/generate_api", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_envelope(r, 400, "invalid_json", success=True)


def test_unknown_compat_routes_are_config_errors():
    with pytest.raises(ValidationError, match="unknown compat routes"):
        AppArgs.model_validate({**BASE, "compat": {"routes": {"/nope": False}}})
