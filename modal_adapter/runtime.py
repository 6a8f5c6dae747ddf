"""What runs inside the Modal classes: no model or pipeline logic, only hosting.

- :class:`ServerHost` is the base of every generated deployment class: it builds the
  servers of its deployments (one, or several packed on one GPU) from
  ``serve_apps.registry`` and exposes two methods, ``call`` and ``stream``, through which
  the ingress reaches any server method by deployment and name;
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
    """Hosts the servers of one or more deployments. Subclasses set ``SERVERS``
    (deployment name -> its server's config).

    Servers are kept per (class, deployment) (one set per container on Modal), so the
    instance that ``.local()`` makes and a plain instance share them in-process. They
    start in ``@modal.enter`` on Modal, and on first use everywhere (``.local()`` runs no
    enter hook for async methods).
    """

    SERVERS: ClassVar[dict[str, dict[str, Any]]] = {}
    # A class whose server calls the graph (ServiceSpec.graph, the batch runner) also gets
    # the app's args and the other services (service -> (Modal class, host class,
    # deployment name)), as the ingress does.
    ARGS: ClassVar[dict[str, Any]] = {}
    SERVICES: ClassVar[dict[str, tuple[Any, type[ServerHost], str]]] = {}
    # Keyed by (host class, deployment): one server per deployment, whoever calls.
    _servers: ClassVar[dict[tuple[type, str], Any]] = {}
    _starting: ClassVar[dict[tuple[type, str], asyncio.Task[Any]]] = {}

    def _deployment(self, deployment: str | None) -> str:
        if deployment is None and len(self.SERVERS) == 1:
            return next(iter(self.SERVERS))
        if deployment not in self.SERVERS:
            raise InvalidRequestError(
                f"{type(self).__name__} hosts {sorted(self.SERVERS)}, not {deployment!r}"
            )
        return deployment

    async def _server(self, deployment: str | None = None) -> Any:
        key = (type(self), self._deployment(deployment))
        server = ServerHost._servers.get(key)
        if server is not None:
            return server
        task = ServerHost._starting.get(key)
        if task is None:  # first caller starts it; concurrent callers wait for the same task
            task = asyncio.ensure_future(self._start(key[1]))
            ServerHost._starting[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                ServerHost._starting.pop(key, None)

    async def _start(self, deployment: str) -> Any:
        from serve_apps.registry import spec

        entry = spec(deployment)
        kwargs: dict[str, Any] = {}
        if entry.graph:
            from serve_apps.batch.runner import Graph
            from serve_apps.registry import AppArgs

            local = modal.is_local()
            kwargs["graph"] = Graph(
                AppArgs.model_validate(self.ARGS),
                {
                    service: ModalHandle(modal_cls, host_cls, name, local=local)
                    for service, (modal_cls, host_cls, name) in self.SERVICES.items()
                },
            )
        server = entry.build(self.SERVERS[deployment], **kwargs)
        await server.start()
        ServerHost._servers[(type(self), deployment)] = server
        return server

    async def _method(self, name: str, deployment: str | None = None) -> Any:
        if name.startswith("_"):
            raise InvalidRequestError(
                f"{deployment or type(self).__name__} has no public method {name!r}"
            )
        return getattr(await self._server(deployment), name)

    @classmethod
    async def shutdown_all(cls) -> None:
        """Shut down every server this host class started in this process (tests)."""
        for key in [k for k in ServerHost._servers if k[0] is cls]:
            await ServerHost._servers.pop(key).shutdown()

    async def _iterate(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
        deployment: str | None = None,
    ):
        with bind(meta):
            async for item in (await self._method(method, deployment))(*args, **kwargs):
                yield item

    @modal.enter()
    async def load(self) -> None:
        from serve_apps.request_context import log_json_to_stderr

        log_json_to_stderr()  # JSON log lines with the request's ID (ServerHost.call binds it)
        await asyncio.gather(*(self._server(name) for name in self.SERVERS))

    @modal.method()
    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
        deployment: str | None = None,
    ) -> Any:
        with bind(meta):
            return await (await self._method(method, deployment))(*args, **kwargs)

    @modal.method()
    async def stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: RequestMeta | None = None,
        deployment: str | None = None,
    ):
        async for item in self._iterate(method, args, kwargs, meta, deployment):
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

    def __init__(self, modal_cls: Any, host_cls: type[ServerHost], deployment: str, *, local: bool):
        self._obj = modal_cls()
        self._host_cls = host_cls
        self._deployment = deployment
        self._local = local
        self._name = deployment

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        d = self._deployment
        for attempt in range(self.RETRIES + 1):
            try:
                if self._local:
                    return await self._obj.call.local(method, args, kwargs, current(), d)
                return await self._obj.call.remote.aio(method, args, kwargs, current(), d)
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
            return self._host_cls()._iterate(method, args, kwargs, current(), self._deployment)
        return self._obj.stream.remote_gen.aio(method, args, kwargs, current(), self._deployment)


class IngressHost:
    """The ingress class: the FastAPI app of every target, over Modal handles.

    Subclasses set ``ARGS`` (the validated ``AppArgs``, JSON) and ``SERVICES`` (service ->
    (Modal class, host class, deployment name)).
    """

    ARGS: ClassVar[dict[str, Any]] = {}
    SERVICES: ClassVar[dict[str, tuple[Any, type[ServerHost], str]]] = {}

    @modal.asgi_app()
    def web(self) -> Any:
        from serve_apps.ingress import create_app
        from serve_apps.registry import AppArgs
        from serve_apps.request_context import log_json_to_stderr

        local = modal.is_local()
        if not local:
            log_json_to_stderr()  # Modal's log view: JSON lines with request_id, key name
        handles = {
            service: ModalHandle(modal_cls, host_cls, deployment, local=local)
            for service, (modal_cls, host_cls, deployment) in self.SERVICES.items()
        }
        return create_app(AppArgs.model_validate(self.ARGS), handles)
