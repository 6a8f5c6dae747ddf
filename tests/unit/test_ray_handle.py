"""The Ray adapter's pieces that need no cluster: error mapping at the handle, placement."""

from __future__ import annotations

import pytest
from ray.serve.exceptions import BackPressureError

from serve_apps.errors import ConstraintError, OverloadedError
from serve_apps.ray_app import RayHandle, _takes_placement_group


class FakeStream:
    def __init__(self, error: BaseException):
        self.error = error
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise self.error

    def cancel(self):
        self.cancelled = True


class FakeDeploymentHandle:
    """Stands for a DeploymentHandle whose calls all fail with ``error``."""

    def __init__(self, error: BaseException):
        self.error = error
        self.streams: list[FakeStream] = []

    def options(self, **_):
        return self

    def __getattr__(self, method):
        handle = self

        class Method:
            def remote(self, *args, **kwargs):
                if method.endswith("_stream"):
                    handle.streams.append(FakeStream(handle.error))
                    return handle.streams[-1]

                async def fail():
                    raise handle.error

                return fail()

        return Method()


class WrappedLikeRay(Exception):  # RayTaskError keeps the replica's exception in .cause
    def __init__(self, cause):
        super().__init__("wrapped")
        self.cause = cause


async def test_a_full_queue_at_the_handle_is_a_503():
    handle = RayHandle(FakeDeploymentHandle(BackPressureError(64, 64)))
    with pytest.raises(OverloadedError, match="max_queued_requests=64"):
        await handle.call("chat", object())
    with pytest.raises(OverloadedError):
        async for _ in handle.stream("chat_stream", object()):
            pass


async def test_the_replicas_own_error_arrives_unwrapped_and_streams_are_cancelled():
    fake = FakeDeploymentHandle(WrappedLikeRay(ConstraintError("bad regex", param="regex")))
    handle = RayHandle(fake)
    with pytest.raises(ConstraintError):
        await handle.call("generate", object())
    with pytest.raises(ConstraintError):
        async for _ in handle.stream("chat_stream", object()):
            pass
    assert fake.streams[-1].cancelled


def test_only_servers_with_engine_workers_take_a_placement_group():
    from serve_apps.registry import SERVICES

    takes = {s.name: _takes_placement_group(s.server) for s in SERVICES}
    # The model servers (vLLM workers, the detector's too); the others run in the replica
    # process alone.
    assert takes == {
        "LLM": True,
        "Codegen": True,
        "Detector": True,
        "SAM": False,
        "Grounder": False,
        "BatchRunner": False,
    }
