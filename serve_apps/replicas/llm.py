"""``LLMServer``: one LLM-style model (the llm or the codegen deployment) behind the APIs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, ClassVar, TypeVar

from ..config import ModelConfig, Settings
from ..engines.base import (
    Constraint,
    GenerationOutput,
    GenerationRequest,
    LLMEngine,
    SamplingParams,
    TokenLogprob,
)
from ..errors import InvalidRequestError, ModelNotFoundError, UnsupportedError
from ..schemas.common import Constraints, Usage
from ..schemas.generate import GenerateMetadata, GenerateRequest, GenerateResponse
from ..schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    SamplingFields,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from ..schemas.openai import TokenLogprob as WireTokenLogprob
from ..service_time import EngineCall, ServiceClock
from ..tools import parse_calls, tool_grammar, tool_prompt

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _constraint(c: Constraints | None) -> Constraint | None:
    if c is None or c.kind is None:
        return None
    return Constraint(kind=c.kind, spec=c.spec)


def _mask(c: Constraints | None) -> dict[str, Any]:
    """A constraints' token mask as ``SamplingParams`` fields."""
    if c is None:
        return {}
    allowed, forbidden = c.token_ids()
    return {"allowed_token_ids": allowed, "forbidden_token_ids": forbidden}


def _image_from_data_url(url: str) -> Any:
    from ..images import decode_image, image_bytes_from_field

    # The ingress enforced the byte and pixel limits; these only bound what reaches here
    # some other way (a server called in-process).
    return decode_image(image_bytes_from_field(url, max_bytes=1 << 30, param="image_url"))


def _usage(outs: Sequence[GenerationOutput]) -> Usage:
    """One prompt, ``n`` completions; logged (counts and finish reasons, never text), with
    the request's ID and key name (:func:`serve_apps.request_context.install_log_context`)."""
    completion = sum(o.completion_tokens for o in outs)
    logger.info(
        "generation finished: %d prompt tokens, %d generated, %s",
        outs[0].prompt_tokens,
        completion,
        ",".join(str(o.finish_reason) for o in outs),
    )
    return Usage(
        prompt_tokens=outs[0].prompt_tokens,
        completion_tokens=completion,
        total_tokens=outs[0].prompt_tokens + completion,
    )


def _copies(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` independent requests for one prompt (``n`` choices); a seed ``s`` gives the
    copies seeds ``s, s+1, ...`` so the choices differ and each is reproducible."""
    if n == 1:
        return [gen]
    seed = gen.sampling.seed

    def seed_of(i: int) -> int | None:
        if seed is None:
            return None
        return seed + i if seed + i < 2**63 else seed - i

    return [
        dataclasses.replace(
            gen,
            request_id=f"{gen.request_id}-{i}",
            sampling=dataclasses.replace(gen.sampling, seed=seed_of(i)),
        )
        for i in range(n)
    ]


async def _all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """All results, or the first failure with the others cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def _chunked(
    stream: AsyncIterator[GenerationOutput], tokens: int
) -> AsyncIterator[GenerationOutput]:
    """The first output at once, then outputs joined until they hold ``tokens`` tokens (the
    last one whatever it holds): ``stream_interval``, the same for every backend."""
    pending: list[GenerationOutput] = []
    first = True
    try:
        async for out in stream:
            pending.append(out)
            count = sum(len(o.token_ids) for o in pending)
            if first or out.finish_reason is not None or count >= tokens:
                yield pending[0] if len(pending) == 1 else GenerationOutput.join(pending)
                pending, first = [], False
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, each with its stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


def _wire_logprob(lp: TokenLogprob) -> WireTokenLogprob:
    return WireTokenLogprob(
        token=lp.token,
        logprob=lp.logprob,
        bytes=list(lp.token.encode()),
        top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top],
    )


def _chat_logprobs(out: GenerationOutput) -> ChoiceLogprobs | None:
    if out.logprobs is None:
        return None
    return ChoiceLogprobs(content=[_wire_logprob(lp) for lp in out.logprobs])


def _completion_logprobs(out: GenerationOutput, offset: int = 0) -> CompletionLogprobs | None:
    if out.logprobs is None:
        return None
    offsets: list[int] = []
    for lp in out.logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in out.logprobs],
        token_logprobs=[lp.logprob for lp in out.logprobs],
        top_logprobs=[dict(lp.top) for lp in out.logprobs],
        text_offset=offsets,
    )


def _tool_message(
    out: GenerationOutput, tools_active: bool, call_id: str
) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a finished output, and its finish reason."""
    calls = parse_calls(out.text) if tools_active else None
    if calls is None:
        return AssistantMessage(content=out.text), out.finish_reason
    return (
        AssistantMessage(
            content=None,
            tool_calls=[
                ToolCall(
                    id=f"call_{call_id}_{i}",
                    function=FunctionCall(name=c.name, arguments=c.arguments),
                )
                for i, c in enumerate(calls)
            ],
        ),
        "tool_calls",
    )


class LLMServer:
    """Serves one model: OpenAI chat/completions and the constrained ``generate`` API.

    ``start()`` must be awaited once before use (adapters do it in their constructor /
    ``@modal.enter``). ``engine`` may be given directly (tests pass a fake);
    ``placement_group`` is the Ray placement group a replica holds for the engine's workers.
    """

    config_type: ClassVar[type[ModelConfig]] = ModelConfig
    # The deployment's name in metrics (ServiceSpec.build sets it: LLM, Codegen, ...).
    service: str = "LLM"

    def __init__(
        self,
        config: ModelConfig,
        *,
        engine: LLMEngine | None = None,
        settings: Settings | None = None,
        placement_group: Any = None,
    ):
        self.config = config
        self.engine = engine
        self._settings = settings or Settings()
        # What the serving target reserved for the engine's workers (see create_llm_engine).
        self._placement_group = placement_group

    async def start(self) -> None:
        if self.engine is None:
            import asyncio

            from ..engines import create_llm_engine, resolve_adapters, resolve_model

            model = await asyncio.to_thread(resolve_model, self.config, self._settings)
            adapters = await asyncio.to_thread(resolve_adapters, self.config, self._settings)
            self.engine = create_llm_engine(
                self.config, model, placement_group=self._placement_group, adapters=adapters
            )
        await self.engine.start()
        logger.info("%s ready", self.config.served_model_name)

    @property
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("LLMServer.start() was not awaited")
        return self.engine

    async def health(self) -> dict[str, object]:
        info = self._engine.info()
        return {"model": self.config.served_model_name, "max_model_len": info.max_model_len}

    async def stats(self) -> dict[str, Any]:
        return self._engine.stats()

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    # ------------------------------------------------------------- adapters
    def _adapter(self, model: str | None) -> str | None:
        """The adapter a request's ``model`` names (None: the base model)."""
        if model is None or model == self.config.served_model_name:
            return None
        if self.config.adapter(model) is None:
            raise ModelNotFoundError(
                f"model {model!r} is not served by this service; it serves "
                f"{self.config.served_names}",
                param="model",
            )
        return model

    def _model_name(self, model: str | None) -> str:
        """The served name a response carries: the adapter's, or the base model's."""
        return self._adapter(model) or self.config.served_model_name

    async def hold_adapter(self, name: str) -> str:
        """What Ray Serve's multiplexing calls when a replica first serves adapter ``name``:
        checks the name (the engine loads the weights when a request first needs them, see
        :mod:`serve_apps.engines.adapters`) and returns it."""
        if self._adapter(name) is None:
            raise ModelNotFoundError(f"{name!r} is not an adapter of this model", param="model")
        logger.info(
            "%s: adapter %s is now held by this replica", self.config.served_model_name, name
        )
        return name

    # ------------------------------------------------------------- requests
    def _sampling(self, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens or self.config.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stop_list()),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=req.logprob_count(),
            **_mask(req.constraints),
        )

    async def _chat_request(self, req: ChatCompletionRequest) -> GenerationRequest:
        has_images = any(m.has_images() for m in req.messages)
        if has_images and not self._engine.info().supports_images:
            raise UnsupportedError(
                f"model {self.config.served_model_name} does not take images", param="messages"
            )
        images: list[Any] = []
        messages: list[dict[str, Any]] = []
        constraint = _constraint(req.effective_constraints())
        if req.tools_active():
            assert req.tools is not None
            messages.append({"role": "system", "content": tool_prompt(req.tools)})
            constraint = Constraint(kind="grammar", spec=tool_grammar(req))
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if not m.has_images():
                message: dict[str, Any] = {"role": role, "content": m.text()}
                # A conversation's earlier calls and their results, for the template.
                for key in ("tool_calls", "tool_call_id", "name"):
                    if (m.model_extra or {}).get(key) is not None:
                        message[key] = (m.model_extra or {})[key]
                messages.append(message)
                continue
            assert isinstance(m.content, list)
            parts: list[dict[str, Any]] = []
            for part in m.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                else:
                    assert part.image_url is not None
                    # The ingress has fetched URLs and checked the limits: data URLs only.
                    images.append(await asyncio.to_thread(_image_from_data_url, part.image_url.url))
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        return GenerationRequest(
            prompt=await asyncio.to_thread(self._render_chat, messages),
            sampling=self._sampling(req, req.requested_max_tokens()),
            constraint=constraint,
            images=images,
            add_special_tokens=False,
            adapter=self._adapter(req.model),
        )

    def _render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The model's chat template applied (in a worker thread: it can be slow)."""
        try:
            return self._engine.apply_chat_template(messages)
        except Exception as e:
            # Chat templates refuse some conversations (e.g. roles that do not alternate)
            # with jinja2's TemplateError or raise_exception(): that is the client's request.
            if type(e).__module__.startswith("jinja2"):
                raise InvalidRequestError(
                    f"the model's chat template refused these messages: {e}", param="messages"
                ) from e
            raise

    def _completion_request(self, req: CompletionRequest) -> GenerationRequest:
        return GenerationRequest(
            prompt=req.prompt_text(),
            sampling=self._sampling(req, req.requested_max_tokens()),
            constraint=_constraint(req.effective_constraints()),
            adapter=self._adapter(req.model),
        )

    async def _generate_all(
        self, clock: ServiceClock, gens: Sequence[GenerationRequest]
    ) -> list[GenerationOutput]:
        """Every request's whole output; the engine's share of them goes on ``clock``."""
        call = EngineCall()
        outs = await _all([self._engine.generate_full(g) for g in gens])
        clock.engine(*call.done(), [o.service for o in outs])
        return outs

    # --------------------------------------------------------------- OpenAI
    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        clock = ServiceClock(self.service)
        gen = await self._chat_request(req)
        gens = _copies(gen, req.n)
        outs = await self._generate_all(clock, gens)
        choices = []
        for i, out in enumerate(outs):
            message, finish = _tool_message(out, req.tools_active(), gens[i].request_id)
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_chat_logprobs(out),
                    constraint_satisfied=out.constraint_satisfied,
                )
            )
        clock.finish()
        return ChatCompletionResponse(
            id=f"chatcmpl-{gen.request_id}",
            created=int(time.time()),
            model=self._model_name(req.model),
            choices=choices,
            usage=_usage(outs),
        )

    async def _started(self, gens: list[GenerationRequest]) -> list[AsyncIterator[Any]]:
        """Each request's output stream with its first output already awaited, so that a
        bad request (constraint, context length) fails the call, not a started stream."""
        streams = [self._engine.generate(g) for g in gens]
        try:
            firsts = await _all([anext(s) for s in streams])
        except BaseException:
            for st in streams:
                await st.aclose()  # type: ignore[attr-defined]
            raise

        async def prepend(first: GenerationOutput, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
            try:
                yield first
                async for out in rest:
                    yield out
            finally:
                await rest.aclose()  # type: ignore[attr-defined]

        interval = self.config.stream_interval
        started = [prepend(f, st) for f, st in zip(firsts, streams, strict=True)]
        # Token by token (the default) needs no joining: no extra generator hop per token.
        return started if interval == 1 else [_chunked(st, interval) for st in started]

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        clock = ServiceClock(self.service)
        gen = await self._chat_request(req)
        gens = _copies(gen, req.n)
        created, rid = int(time.time()), f"chatcmpl-{gen.request_id}"
        model = self._model_name(req.model)

        def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

        call = EngineCall()
        streams = await self._started(gens)
        for i in range(len(gens)):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        # With tools, an output that begins with "<" is a call (the grammar allows nothing
        # else there): it is held until it is complete, then sent as one tool_calls delta.
        held: dict[int, list[GenerationOutput]] = {}
        finals: list[GenerationOutput | None] = [None] * len(gens)
        async for i, out in _merge(streams):
            if req.tools_active() and (i in held or out.text.startswith("<")):
                held.setdefault(i, []).append(out)
                if out.finish_reason is None:
                    continue
                whole = GenerationOutput.join(held.pop(i))
                message, finish = _tool_message(whole, True, gens[i].request_id)
                delta = DeltaMessage(
                    content=message.content,
                    tool_calls=[
                        ToolCallDelta(index=k, id=c.id, type="function", function=c.function)
                        for k, c in enumerate(message.tool_calls or [])
                    ]
                    or None,
                )
                out = dataclasses.replace(whole, finish_reason=out.finish_reason)
            else:
                delta, finish = DeltaMessage(content=out.text), out.finish_reason
            if out.finish_reason is not None:
                finals[i] = out
            yield chunk(
                ChatChunkChoice(
                    index=i,
                    delta=delta,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_chat_logprobs(out),
                    constraint_satisfied=out.constraint_satisfied,
                )
            )
        clock.engine(*call.done(), [f.service if f else None for f in finals])
        clock.finish()
        if req.stream_options and req.stream_options.include_usage:
            done = [f for f in finals if f is not None]
            yield ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=_usage(done)
            )

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        clock = ServiceClock(self.service)
        gen = self._completion_request(req)
        outs = await self._generate_all(clock, _copies(gen, req.n))
        clock.finish()
        return CompletionResponse(
            id=f"cmpl-{gen.request_id}",
            created=int(time.time()),
            model=self._model_name(req.model),
            choices=[
                CompletionChoice(
                    index=i,
                    text=out.text,
                    finish_reason=out.finish_reason,
                    logprobs=_completion_logprobs(out),
                    constraint_satisfied=out.constraint_satisfied,
                )
                for i, out in enumerate(outs)
            ],
            usage=_usage(outs),
        )

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        clock = ServiceClock(self.service)
        gen = self._completion_request(req)
        gens = _copies(gen, req.n)
        created, rid = int(time.time()), f"cmpl-{gen.request_id}"
        call = EngineCall()
        streams = await self._started(gens)
        finals: list[GenerationOutput | None] = [None] * len(gens)
        offsets = [0] * len(gens)
        async for i, out in _merge(streams):
            if out.finish_reason is not None:
                finals[i] = out
            yield CompletionResponse(
                id=rid,
                created=created,
                model=self._model_name(req.model),
                choices=[
                    CompletionChoice(
                        index=i,
                        text=out.text,
                        finish_reason=out.finish_reason,
                        logprobs=_completion_logprobs(out, offsets[i]),
                        constraint_satisfied=out.constraint_satisfied,
                    )
                ],
            )
            offsets[i] += sum(len(lp.token) for lp in out.logprobs or ())
        clock.engine(*call.done(), [f.service if f else None for f in finals])
        clock.finish()
        if req.stream_options and req.stream_options.include_usage:
            yield CompletionResponse(
                id=rid,
                created=created,
                model=self._model_name(req.model),
                choices=[],
                usage=_usage([f for f in finals if f is not None]),
            )

    # ------------------------------------------------------------- codegen
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        clock = ServiceClock(self.service)
        constraint = _constraint(req.constraints)
        gen = GenerationRequest(
            prompt=req.prompt,
            sampling=SamplingParams(
                max_tokens=req.max_tokens or self.config.default_max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                **_mask(req.constraints),
            ),
            constraint=constraint,
            request_id=uuid.uuid4().hex,
            adapter=self._adapter(req.model),
        )
        t0 = time.perf_counter()
        (out,) = await self._generate_all(clock, [gen])
        seconds = time.perf_counter() - t0
        assert out.finish_reason is not None
        clock.finish()
        return GenerateResponse(
            generated_text=out.text,
            tokens_generated=out.completion_tokens,
            generation_time_ms=round(seconds * 1000, 3),
            # No grammar (free generation, or a token mask, which sampling always obeys):
            # nothing the text could fail, so true.
            constraint_satisfied=constraint is None or bool(out.constraint_satisfied),
            finish_reason=out.finish_reason,
            metadata=GenerateMetadata(
                model=self._model_name(req.model),
                constraint_type=req.constraints.type_name if req.constraints else "none",
                prompt_tokens=out.prompt_tokens,
                tokens_per_sec=round(out.completion_tokens / seconds, 2) if seconds > 0 else 0.0,
            ),
        )
