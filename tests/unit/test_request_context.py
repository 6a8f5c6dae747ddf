"""The request's meta (ID, deadline, key name): made at the ingress, carried by every handle."""

from __future__ import annotations

import httpx
import pytest

from serve_apps import request_context
from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.ray_app import RayHandle
from serve_apps.request_context import RequestMeta, bind, current
from tests.examples.echo_service import ECHO, EchoServer
from tests.helpers import assert_envelope


class MetaEchoServer(EchoServer):
    """Echoes the request ID the server side sees."""

    async def echo(self, text: str, times: int) -> str:
        meta = current()
        return meta.request_id if meta else "none"


async def echo_app():
    from serve_apps.registry import SERVICES, app_args_type

    args = app_args_type([*SERVICES, ECHO]).model_validate(
        {"echo": {}, "detector": None, "sam": None, "grounder": None}
    )
    server = MetaEchoServer(args.echo)
    await server.start()
    handles = {k: LocalHandle(object()) for k in args.services()} | {"echo": LocalHandle(server)}
    return create_app(args, handles)


async def test_the_request_id_is_the_clients_or_a_new_one_and_reaches_the_server():
    app = await echo_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/echo", json={"text": "x"}, headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123" and r.json() == {"echo": "abc-123"}
        made = await c.post("/v1/echo", json={"text": "x"})
        assert len(made.headers["x-request-id"]) == 32
        assert made.json() == {"echo": made.headers["x-request-id"]}
        # Not a plain token (it would go into logs and headers): replaced.
        odd = await c.post("/v1/echo", json={"text": "x"}, headers={"x-request-id": "a b\tc"})
        assert odd.headers["x-request-id"] != "a b\tc"
        # Errors carry it too, including those the middleware below answers (413, 404).
        bad = await c.post("/v1/echo", json={"text": ""}, headers={"x-request-id": "e1"})
        assert_envelope(bad, 400) and bad.headers["x-request-id"] == "e1"
        big = await c.post("/v1/echo", content=b"x" * 20_000_000, headers={"x-request-id": "e2"})
        assert_envelope(big, 413) and big.headers["x-request-id"] == "e2"


class _Method:
    def __init__(self, calls, streaming):
        self.calls, self.streaming = calls, streaming

    def remote(self, *args):
        self.calls.append(args)
        if self.streaming:

            class Stream:
                def __aiter__(self):
                    return self

                async def __anext__(self):
                    raise StopAsyncIteration

                def cancel(self):
                    pass

            return Stream()

        async def result():
            return "ok"

        return result()


class RecordingDeploymentHandle:
    def __init__(self):
        self.calls: list[tuple] = []

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return _Method(self.calls, streaming=name.endswith("_stream"))


async def test_a_ray_handle_sends_the_current_meta_with_every_call():
    deployment = RecordingDeploymentHandle()
    handle = RayHandle(deployment)
    meta = RequestMeta(request_id="r1", deadline=123.0, key_name="team-a")
    with bind(meta):
        await handle.call("chat", "req")
        async for _ in handle.stream("chat_stream", "req"):
            pass
    assert deployment.calls == [("chat", meta, ("req",), {}), ("chat_stream", meta, ("req",), {})]


async def test_the_ray_replica_binds_the_meta_and_refuses_private_methods():
    from serve_apps.errors import InvalidRequestError
    from serve_apps.ray_app import _replica_class

    replica_class = _replica_class(ECHO)

    class Probe(replica_class):  # type: ignore[misc, valid-type]
        async def echo(self, text, times):
            return current()

    probe = object.__new__(Probe)  # its __init__ would start a server: not needed here
    meta = RequestMeta(request_id="r2")
    assert await probe.invoke("echo", meta, ("x", 1), {}) == meta
    assert current() is None  # unbound again afterwards
    with pytest.raises(InvalidRequestError):
        await probe.invoke("_private", meta, (), {})
    with pytest.raises(InvalidRequestError):
        await probe.invoke("invoke", meta, (), {})


def test_remaining_and_expired():
    import time

    assert RequestMeta().remaining() is None and not RequestMeta().expired()
    soon = RequestMeta(deadline=time.time() + 30)
    assert 29 < soon.remaining() <= 30 and not soon.expired()
    assert RequestMeta(deadline=time.time() - 1).expired()
    assert request_context.current() is None
