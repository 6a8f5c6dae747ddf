"""The Modal handle's error mapping and its one retry, over a fake Modal class (the remote
path, which needs no account: ``.remote.aio`` / ``.remote_gen.aio`` are replaced)."""

from __future__ import annotations

import modal.exception
import pytest

from modal_adapter.runtime import ModalHandle, ServerHost
from serve_apps.errors import (
    ConstraintError,
    DeadlineExceededError,
    OverloadedError,
    UnavailableError,
    error_headers,
)


class Host(ServerHost):
    SERVERS = {"LLM": {}}


def fake_modal_class(*outcomes, stream_items=("a", "b")):
    """A Modal class whose remote calls give ``outcomes`` in turn (an exception is raised;
    for streams, an exception is raised before the first item)."""
    calls = []

    class Remote:
        async def aio(self, *args):
            calls.append(args)
            outcome = outcomes[len(calls) - 1]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    class RemoteGen:
        def aio(self, *args):
            calls.append(args)
            outcome = outcomes[len(calls) - 1]

            async def gen():
                if isinstance(outcome, BaseException):
                    raise outcome
                for item in stream_items:
                    yield item

            return gen()

    class Method:
        remote = Remote()
        remote_gen = RemoteGen()

    class Cls:
        call = Method()
        stream = Method()

    return Cls, calls


async def test_a_call_lost_in_modal_is_retried_once():
    cls, calls = fake_modal_class(modal.exception.InternalFailure("worker lost"), "answer")
    assert await ModalHandle(cls, Host, "LLM", local=False).call("chat", 1) == "answer"
    assert len(calls) == 2


async def test_a_second_loss_is_a_503_with_retry_after():
    lost = modal.exception.ConnectionError("no route")
    cls, calls = fake_modal_class(lost, lost, "never")
    with pytest.raises(UnavailableError) as info:
        await ModalHandle(cls, Host, "LLM", local=False).call("chat", 1)
    assert len(calls) == 2 and "LLM container" in info.value.message
    assert error_headers(info.value) == {"Retry-After": "5"}


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (modal.exception.FunctionTimeoutError("timed out"), DeadlineExceededError),
        (modal.exception.ResourceExhaustedError("quota"), OverloadedError),
        (ConstraintError("bad regex", param="regex"), ConstraintError),
    ],
)
async def test_other_failures_are_not_retried_and_map_to_the_envelope(raised, expected):
    cls, calls = fake_modal_class(raised, "never")
    with pytest.raises(expected):
        await ModalHandle(cls, Host, "LLM", local=False).call("chat", 1)
    assert len(calls) == 1


async def test_a_stream_is_retried_only_before_its_first_item():
    cls, calls = fake_modal_class(modal.exception.InternalFailure("lost"), "ok")
    items = [x async for x in ModalHandle(cls, Host, "LLM", local=False).stream("chat_stream", 1)]
    assert items == ["a", "b"] and len(calls) == 2
