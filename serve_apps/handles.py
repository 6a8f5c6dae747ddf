"""The handle seam: how the ingress calls another deployment, whatever the target.

The ingress and the service pipelines only ever see :class:`Handle`. Each target provides
one implementation:

- :class:`LocalHandle` (here): the server object lives in the same process (tests, and any
  single-process use);
- ``RayHandle`` (``serve_apps.ray_app``): a Ray Serve ``DeploymentHandle``;
- ``ModalHandle`` (``modal_adapter``): a Modal class instance, ``.remote.aio()``.

Whatever the target, a handle re-raises the :class:`serve_apps.errors.ServeAppError` that
the remote server raised, unwrapped, so the ingress maps it to the same HTTP status, and
carries the current :class:`~serve_apps.request_context.RequestMeta` to the server, which
sees it as ``request_context.current()`` (in-process it flows with the task by itself).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Handle(Protocol):
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the remote server and return its result."""
        ...

    def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Call async-generator ``method`` and iterate over what it yields."""
        ...


class LocalHandle:
    """Calls a server object in this process."""

    def __init__(self, target: Any):
        self.target = target

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.target, method)(*args, **kwargs)

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for item in getattr(self.target, method)(*args, **kwargs):
            yield item
