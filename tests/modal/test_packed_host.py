"""A packed Modal class (modal_adapter.runtime.ServerHost with several SERVERS): each
deployment's server is built once, by its own registry entry, and reached by name."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from modal_adapter.runtime import ServerHost
from serve_apps.errors import InvalidRequestError


class FakeServer:
    started: ClassVar[list[str]] = []

    def __init__(self, name: str, config: dict[str, Any]):
        self.name, self.config, self.closed = name, config, False

    async def start(self) -> None:
        FakeServer.started.append(self.name)

    async def shutdown(self) -> None:
        self.closed = True

    async def whoami(self) -> tuple[str, dict[str, Any]]:
        return self.name, self.config

    async def count(self, n: int):
        for i in range(n):
            yield f"{self.name}:{i}"


class FakeSpec:
    graph = False  # calls no other service (ServiceSpec.graph)

    def __init__(self, name: str):
        self.name = name

    def build(self, config: dict[str, Any]) -> FakeServer:
        return FakeServer(self.name, config)


@pytest.fixture
def packed(monkeypatch):
    import serve_apps.registry

    monkeypatch.setattr(serve_apps.registry, "spec", FakeSpec)
    FakeServer.started.clear()
    host = type("DetectorSAM", (ServerHost,), {"SERVERS": {"Detector": {"a": 1}, "SAM": {"b": 2}}})
    yield host
    for key in [k for k in ServerHost._servers if k[0] is host]:
        ServerHost._servers.pop(key)


async def test_each_deployment_is_reached_by_name_and_built_once(packed):
    host = packed()
    assert await (await host._method("whoami", "SAM"))() == ("SAM", {"b": 2})
    assert await (await host._method("whoami", "Detector"))() == ("Detector", {"a": 1})
    assert await (await packed()._method("whoami", "SAM"))() == ("SAM", {"b": 2})
    assert FakeServer.started == ["SAM", "Detector"]
    items = [i async for i in host._iterate("count", (2,), {}, None, "Detector")]
    assert items == ["Detector:0", "Detector:1"]


async def test_a_packed_class_needs_the_deployment_name(packed):
    with pytest.raises(InvalidRequestError, match="hosts \\['Detector', 'SAM'\\], not None"):
        await packed()._method("whoami")
    with pytest.raises(InvalidRequestError, match="not 'LLM'"):
        await packed()._method("whoami", "LLM")
    with pytest.raises(InvalidRequestError, match="no public method '_start'"):
        await packed()._method("_start", "SAM")


async def test_shutdown_all_closes_every_server_of_the_class(packed):
    a = await packed()._server("Detector")
    b = await packed()._server("SAM")
    await packed.shutdown_all()
    assert a.closed and b.closed
    assert not [k for k in ServerHost._servers if k[0] is packed]


async def test_a_single_class_needs_no_name(monkeypatch):
    import serve_apps.registry

    monkeypatch.setattr(serve_apps.registry, "spec", FakeSpec)
    host = type("LLMHost", (ServerHost,), {"SERVERS": {"LLM": {}}})
    try:
        assert await (await host()._method("whoami"))() == ("LLM", {})
    finally:
        await host.shutdown_all()
