"""Typed clients over the handle seam: how the ingress calls the servers of the graph.

A :class:`~serve_apps.handles.Handle` carries a call by method name, because that is what a
Ray ``DeploymentHandle`` or a Modal class takes. Nothing above the seam uses names:
routers and pipelines hold one client per service and call its methods, e.g.
``await sam.segment(image, boxes)``.

Each client method names the server method it calls (``SegmenterServer.segment``), so
mypy checks the call against the server: a renamed server method, a reordered argument or
a changed result type is a type error here, not an ``AttributeError`` on a replica.
Importing the server classes is cheap (their engines are imported when they start).

Clients also enforce the request's deadline (``request_context.current().deadline``): a
call or a stream still running when it passes is cancelled (on Ray Serve the replica's
work is cancelled with it, freeing its slot) and becomes a 504 ``DeadlineExceededError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from . import front_door
from .errors import DeadlineExceededError
from .handles import Handle
from .replicas import Server
from .replicas.llm import LLMServer
from .replicas.vision import DetectorServer, GrounderServer, SegmenterServer
from .request_context import current
from .schemas.generate import GenerateRequest, GenerateResponse
from .schemas.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    StreamOptions,
)
from .schemas.vision import DetectCall, DetectResult, EncodeResult, PhraseResult, SegmentResult

P = ParamSpec("P")
R = TypeVar("R")


class Client:
    """Base of the typed clients: a handle, and calls checked against a server's methods."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle

    async def _call(
        self,
        method: Callable[Concatenate[Any, P], Awaitable[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        result: R = await _within_deadline(self.handle.call(method.__name__, *args, **kwargs))
        return result

    def _stream(
        self,
        method: Callable[Concatenate[Any, P], AsyncIterator[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> AsyncIterator[R]:
        return _stream_within_deadline(self.handle.stream(method.__name__, *args, **kwargs))

    async def health(self) -> Any:
        """The server's health check; raises when it is not ready."""
        return await self._call(Server.health)


def _deadline_passed(during: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"the request's deadline passed {during}")


async def _within_deadline(call: Awaitable[R]) -> R:
    meta = current()
    left = None if meta is None else meta.remaining()
    if left is None:
        return await call
    if left <= 0:
        if asyncio.iscoroutine(call):
            call.close()  # never started
        raise _deadline_passed("before the request reached the service")
    timeout = asyncio.timeout(left)
    try:
        async with timeout:
            return await call
    except TimeoutError:
        if timeout.expired():
            raise _deadline_passed("while the service worked on it") from None
        raise


async def _stream_within_deadline(items: AsyncIterator[R]) -> AsyncIterator[R]:
    iterator = aiter(items)
    try:
        while True:
            try:
                item = await _within_deadline(anext(iterator))
            except StopAsyncIteration:
                return
            yield item
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]


S = TypeVar("S", ChatCompletionChunk, CompletionResponse)


def _with_usage(req: Any) -> Any:
    """The request, asking for the usage chunk at the end of its stream (the front door
    settles the tokens it reserved with it)."""
    return req.model_copy(update={"stream_options": StreamOptions(include_usage=True)})


async def _metered(stream: AsyncIterator[S], wanted_usage: bool) -> AsyncIterator[S]:
    """A generation stream as the caller asked for it, its first chunk and usage recorded
    (:mod:`serve_apps.front_door`); the usage chunk is dropped when the caller did not ask
    for it."""
    async for item in stream:
        front_door.record_first_token()
        if item.usage is not None and not item.choices:
            front_door.record_usage(item.usage.prompt_tokens, item.usage.completion_tokens)
            if not wanted_usage:
                continue
        yield item


def _wants_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class LLMClient(Client):
    """An LLM-style service (llm, codegen; the detector is one too). Every generation's
    usage is recorded for the metrics and the tokens-per-minute limits."""

    def for_model(self, model_id: str) -> Self:
        """This client with its calls routed for ``model_id`` (an adapter's name): where the
        handle can route by model (Ray Serve's multiplexing), to the replicas that already
        hold it; elsewhere (in-process, Modal) the same handle: the same class serves it."""
        route = getattr(self.handle, "for_model", None)
        return self if route is None else type(self)(route(model_id))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        response = await self._call(LLMServer.chat, req)
        front_door.record_usage(response.usage.prompt_tokens, response.usage.completion_tokens)
        return response

    def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        stream = self._stream(LLMServer.chat_stream, _with_usage(req))
        return _metered(stream, _wants_usage(req))

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        response = await self._call(LLMServer.completion, req)
        if response.usage is not None:
            usage = response.usage
            front_door.record_usage(usage.prompt_tokens, usage.completion_tokens)
        return response

    def completion_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        stream = self._stream(LLMServer.completion_stream, _with_usage(req))
        return _metered(stream, _wants_usage(req))

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        response = await self._call(LLMServer.generate, req)
        front_door.record_usage(response.metadata.prompt_tokens, response.tokens_generated)
        return response


class DetectorClient(LLMClient):
    """The detector: an LLM service whose model sees images, plus Rex-Omni detection."""

    async def detect(self, call: DetectCall) -> DetectResult:
        return await self._call(DetectorServer.detect, call)


class SegmenterClient(Client):
    """SAM: image encodings (cached by the server) and masks for boxes."""

    async def encode(self, image: bytes) -> EncodeResult:
        return await self._call(SegmenterServer.encode, image)

    async def segment(self, image: bytes, boxes: list[list[float]]) -> SegmentResult:
        return await self._call(SegmenterServer.segment, image, boxes)


class GrounderClient(Client):
    """The grounder: a caption's noun phrases."""

    async def phrases(self, caption: str) -> list[PhraseResult]:
        return await self._call(GrounderServer.phrases, caption)
