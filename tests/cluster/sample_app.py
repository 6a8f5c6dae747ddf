"""A Serve app builder whose deployment names come from its args: the cluster tools must
handle deployments they have never heard of (e.g. the vision services)."""

from __future__ import annotations

from typing import Any

from ray import serve


@serve.deployment
class _Service:
    def __init__(self, name: str):
        self.name = name

    async def __call__(self) -> str:
        return self.name


@serve.deployment
class _Front:
    def __init__(self, services: dict[str, Any]):
        self.services = services

    async def __call__(self) -> list[str]:
        return sorted(self.services)


def build(args: dict[str, Any]) -> serve.Application:
    services = {name: _Service.options(name=name).bind(name) for name in args["services"]}
    return _Front.options(name=args.get("front", "Front")).bind(services)
