"""A new service, written the way docs/architecture.md says to add one: this one module
(its config, its server, its typed client and its router) plus one registry entry
(:data:`ECHO`). Nothing else in the project changes. tests/unit/test_registry.py serves it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import APIRouter
from pydantic import BaseModel, Field

from serve_apps.clients import Client
from serve_apps.registry import AppContext, ServiceSpec
from serve_apps.schemas.common import StrictModel


class EchoConfig(StrictModel):
    prefix: str = "echo: "


class EchoServer:
    """What one replica of the Echo deployment runs."""

    config_type: ClassVar[type[EchoConfig]] = EchoConfig

    def __init__(self, config: EchoConfig, **_: Any):
        self.config = config
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def health(self) -> dict[str, bool]:
        return {"started": self.started}

    async def shutdown(self) -> None:
        self.started = False

    async def echo(self, text: str, times: int) -> str:
        return self.config.prefix + " ".join([text] * times)


class EchoClient(Client):
    async def echo(self, text: str, times: int = 1) -> str:
        return await self._call(EchoServer.echo, text, times)


class EchoRequest(StrictModel):
    text: str = Field(min_length=1)
    times: int = Field(default=1, ge=1, le=3)


class EchoResponse(BaseModel):
    echo: str


def router(ctx: AppContext) -> APIRouter:
    api = APIRouter(tags=["echo"])
    client = ctx.require(ECHO, "/v1/echo")

    @api.post("/v1/echo", response_model=EchoResponse)
    async def echo(req: EchoRequest) -> EchoResponse:
        return EchoResponse(echo=await client.echo(req.text, req.times))

    return api


ECHO = ServiceSpec(
    name="Echo",
    key="echo",
    config_type=EchoConfig,
    default=None,  # off unless the config has an `echo:` section
    server=EchoServer,
    client=EchoClient,
    description="repeats what it is told",
    extras=(),
    cpus=0.1,
    routers=("tests.examples.echo_service:router",),
)
