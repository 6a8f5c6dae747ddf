"""The registry of services: the one table everything else derives from."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter
from pydantic import ValidationError

from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.registry import (
    SERVICES,
    AppArgs,
    AppContext,
    app_args_type,
    create_servers,
    extras_for,
)
from tests.examples.echo_service import ECHO, EchoServer
from tests.helpers import assert_envelope


def test_app_args_has_one_field_per_service_and_the_shared_sections():
    shared = {"limits", "images", "modal", "compat", "auth", "rate_limits"}
    assert set(AppArgs.model_fields) == {s.key for s in SERVICES} | shared
    for s in SERVICES:
        field = AppArgs.model_fields[s.key]
        assert field.description == s.description
        # On by default, unless its entry says otherwise (the batch runner: off).
        if s.default is None:
            assert AppArgs().config(s) is None
        else:
            assert isinstance(AppArgs().config(s), s.config_type)


def test_null_leaves_a_service_out_of_everything():
    args = AppArgs.model_validate({"sam": None, "grounder": None})
    assert args.services() == ["llm", "codegen", "detector"]
    assert "sam" not in create_servers(args)
    assert "vision" in extras_for(args)  # the detector still needs it
    text_only = AppArgs.model_validate({"detector": None, "sam": None, "grounder": None})
    assert extras_for(text_only) == ["llm"]


def test_extras_come_from_the_services_and_their_backends():
    args = AppArgs.model_validate({"llm": {"served_model_name": "m", "backend": "vllm"}})
    assert extras_for(args) == ["llm", "vllm", "vision"]


def test_every_router_path_of_the_registry_builds_a_router():
    args = AppArgs()
    servers = create_servers(args)
    ctx = AppContext.from_handles(args, {k: LocalHandle(v) for k, v in servers.items()})
    routers = ctx.routers()
    assert all(isinstance(r, APIRouter) for r in routers)
    # health, compat, openai, generate, vision: each family mounted once
    assert len(routers) == 5


def test_an_unknown_service_key_is_an_error_that_names_it():
    with pytest.raises(ValidationError, match="echo"):
        AppArgs.model_validate({"echo": {}})


# ------------------------------------------------------- a new service, end to end
EchoArgs = app_args_type([*SERVICES, ECHO])


async def test_a_new_service_is_one_module_and_one_registry_entry():
    """tests/examples/echo_service.py + ECHO: config, deployment, client and route."""
    args = EchoArgs.model_validate(
        {"echo": {"prefix": "> "}, "detector": None, "sam": None, "grounder": None}
    )
    assert args.services() == ["llm", "codegen", "echo"]
    servers = create_servers(args)
    assert isinstance(servers["echo"], EchoServer)
    for server in servers.values():
        await server.start()
    app = create_app(args, {k: LocalHandle(v) for k, v in servers.items()})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/echo", json={"text": "hi", "times": 2})
        assert r.status_code == 200 and r.json() == {"echo": "> hi hi"}
        assert_envelope(await c.post("/v1/echo", json={"text": "hi", "times": 9}), 400)
        assert (await c.get("/health")).status_code == 200  # the new service's health too
        # Its config turned off: the route is not mounted.
    off = EchoArgs.model_validate({"detector": None, "sam": None, "grounder": None})
    servers = create_servers(off)
    app = create_app(off, {k: LocalHandle(v) for k, v in servers.items()})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert_envelope(await c.post("/v1/echo", json={"text": "hi"}), 404)


def test_the_new_service_gets_a_ray_serve_deployment_by_its_name():
    from serve_apps.ray_app import deployment

    echo = deployment(ECHO)
    assert echo.name == "EchoReplica" and echo.ray_actor_options == {"num_cpus": 0.1}
    assert deployment(ECHO) is echo  # one per entry


def test_the_architecture_docs_list_every_service_as_registered():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    table = doc.split("## The registry", 1)[1].split("\n\n")[2]  # after the lead sentence
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # no header
    documented = {}
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        documented[cells[2]] = cells
    assert set(documented) == {s.key for s in SERVICES}
    for s in SERVICES:
        _, name, _key, server, client, extras, routers = documented[s.key]
        assert (name, server, client) == (s.name, s.server.__name__, s.client.__name__)
        assert (extras.split(", ") if extras else []) == list(s.extras)
        families = [p.split(":")[0].rsplit(".", 1)[1] for p in s.routers]
        assert routers.split(", ") == families
