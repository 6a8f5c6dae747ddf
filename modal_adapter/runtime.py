"""What runs inside the Modal classes: no model or pipeline logic, only hosting.

- :class:`ServerHost` is the base of every generated deployment class: it builds the
  deployment's server from ``serve_apps.registry`` and exposes two methods, ``call`` and
  ``stream``, through which the ingress reaches any server method by name;
- :class:`IngressHost` is the base of the ingress class: ``web`` returns the same FastAPI
  app as on Ray Serve (``serve_apps.ingress.create_app``) with a :class:`ModalHandle` per
  service;
- :class:`ModalHandle` is the Modal side of the handle seam (``serve_apps.handles``): a
  call lost to Modal's infrastructure before any byte is retried once, then a 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import modal
import modal.exception

from serve_apps.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    ServeAppError,
    UnavailableError,
    unwrap,
)
from serve_apps.request_context import RequestMeta, bind, current


class ServerHost:
    """Hosts one deployment's server. Subclasses set ``DEPLOYMENT`` and ``CONFIG``.

    The server is kept per class (one per container on Modal), so the instance that
    ``.local()`` makes and a plain instance share it in-process. It starts in
    ``@modal.enter`` on Modal, and on first use everywhere (``.local()`` runs no enter
    hook for async methods).
    """

    DEPLOYMENT: ClassVar[str] = ""
    CONFIG: ClassVar[dict[str, Any]] = {}
    # A service that calls the graph (ServiceSpec.graph, the batch runner) also gets the
    # app's args and the other services' classes (service -> (Modal class, host class)).
    ARGS: ClassVar[dict[str, Any]] = {}
    SERVICES: ClassVar[dict[str, tuple[Any, type[ServerHost]]]] = {}
    # Keyed by the host class: one server per deployment class, whoever calls.
    _servers: ClassVar[dict[type, Any]] = {}
    _starting: ClassVar[dict[type, asyncio.Task[Any]]] = {}

    async def _server(self) -> Any:
        key = type(self)
        server = ServerHost._servers.get(key)
        if server is not None:
            return server
        task = ServerHost._starting.get(key)
        if task is None:  # first caller starts it; concurrent callers wait for the same task
            task = asyncio.ensure_future(self._start())
            ServerHost._starting[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                ServerHost._starting.pop(key, None)

    async def _start(self) -> Any:
        from serve_apps.registry import spec

        entry = spec(self.DEPLOYMENT)
        kwargs: dict[str, Any] = {}
        if entry.graph:
            from serve_apps.batch.runner import Graph
            from serve_apps.registry import AppArgs

            local = modal.is_local()
            kwargs["graph"] = Graph(
                AppArgs.model_validate(self.ARGS),
                {
                    service: ModalHandle(modal_cls, host_cls, local=local)
                    for service, (modal_cls, host_cls) in self.SERVICES.items()
                },
            )
        server = entry.build(self.CONFIG, **kwargs)
        await server.start()
        ServerHost._servers[type(self)] = server
        return server

    async def _method(self, name: str) -> Any:
        if name.startswith("_"):
            raise InvalidRequestError(f"{self.DEPLOYMENT} has no public method {name!r}")
        return getattr(await self._server(), name)

    async def _iterate(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
    ):
        with bind(meta):
            async for item in (await self._method(method))(*args, **kwargs):
                yield item

    @modal.enter()
    async def load(self) -> None:
        await self._server()

    @modal.method()
    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
    ) -> Any:
        with bind(meta):
            return await (await self._method(method))(*args, **kwargs)

    @modal.method()
    async def stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
    ):
        async for item in self._iterate(method, args, kwargs, meta):
            yield item


logger = logging.getLogger(__name__)

# Failures of Modal's infrastructure, not of the request: a lost connection to Modal, an
# internal error Modal itself calls retriable, a container that went away holding the input.
TRANSIENT: tuple[type[BaseException], ...] = (
    modal.exception.ConnectionError,
    modal.exception.InternalFailure,
    modal.exception.InternalError,
    modal.exception.ServiceError,
)


def modal_error(e: BaseException, service: str) -> BaseException:
    """The error a client gets for an exception from a Modal call: the server's own error
    unwrapped; Modal's timeouts and quotas as 504 / 503 with ``Retry-After``."""
    if isinstance(e, modal.exception.FunctionTimeoutError):
        return DeadlineExceededError(f"the {service} call ran past Modal's function timeout")
    if isinstance(e, modal.exception.ResourceExhaustedError):
        return OverloadedError(f"Modal has no capacity for {service} now ({e}); retry shortly")
    if isinstance(e, TRANSIENT):
        return UnavailableError(f"the {service} container serving this request was lost; retry")
    return unwrap(e)


class ModalHandle:
    """:class:`serve_apps.handles.Handle` over a Modal class of this app.

    ``local=True`` (``modal.is_local()``: tests, ``modal run`` on a laptop) runs the class
    in this process through ``.local()``; otherwise calls go to its containers with
    ``.remote.aio()`` / ``.remote_gen.aio()``. Remote exceptions come back as the server
    raised them, unwrapped, like on Ray Serve.
    """

    RETRIES = 1  # as on Ray: a call lost to Modal's infrastructure before any byte

    def __init__(self, modal_cls: Any, host_cls: type[ServerHost], *, local: bool):
        self._obj = modal_cls()
        self._host_cls = host_cls
        self._local = local
        self._name = host_cls.DEPLOYMENT or "service"

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(self.RETRIES + 1):
            try:
                if self._local:
                    return await self._obj.call.local(method, args, kwargs, current())
                return await self._obj.call.remote.aio(method, args, kwargs, current())
            except ServeAppError:
                raise
            except TRANSIENT as e:
                if attempt == self.RETRIES:
                    raise modal_error(e, self._name) from e
                logger.warning("a %s call failed in Modal (%s); retrying", self._name, e)
            except Exception as e:
                raise modal_error(e, self._name) from e
        raise AssertionError("unreachable")

    async def stream(self, method: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for attempt in range(self.RETRIES + 1):
            started = False
            items = self._items(method, args, kwargs)
            try:
                async for item in items:
                    started = True
                    yield item
                return
            except ServeAppError:
                raise
            except TRANSIENT as e:
                if started or attempt == self.RETRIES:
                    raise modal_error(e, self._name) from e
                logger.warning("a %s stream failed in Modal (%s); retrying", self._name, e)
            except Exception as e:
                raise modal_error(e, self._name) from e
            finally:
                await items.aclose()

    def _items(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._local:
            # modal 1.6.4's `.local()` awaits every async method's result, and an async
            # generator cannot be awaited (modal/_functions.py, _Function.local: TypeError
            # "object async_generator can't be used in 'await' expression"). In-process we
            # iterate the same undecorated helper `stream` wraps, on a plain instance of
            # the host class; it shares the deployment's server with `.local()`.
            return self._host_cls()._iterate(method, args, kwargs, current())
        return self._obj.stream.remote_gen.aio(method, args, kwargs, current())


class IngressHost:
    """The ingress class: the FastAPI app of every target, over Modal handles.

    Subclasses set ``ARGS`` (the validated ``AppArgs``, JSON) and ``SERVICES`` (service ->
    (Modal class, host class)).
    """

    ARGS: ClassVar[dict[str, Any]] = {}
    SERVICES: ClassVar[dict[str, tuple[Any, type[ServerHost]]]] = {}

    @modal.asgi_app()
    def web(self) -> Any:
        from serve_apps.ingress import create_app
        from serve_apps.registry import AppArgs

        local = modal.is_local()
        handles = {
            service: ModalHandle(modal_cls, host_cls, local=local)
            for service, (modal_cls, host_cls) in self.SERVICES.items()
        }
        return create_app(AppArgs.model_validate(self.ARGS), handles)
