"""``LLMServer``: one LLM-style model (the llm or the codegen deployment) behind the APIs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from ..config import ModelConfig, Settings
from ..engines.base import (
    Constraint,
    GenerationOutput,
    GenerationRequest,
    LLMEngine,
    SamplingParams,
)
from ..errors import InvalidRequestError, UnsupportedError
from ..schemas.common import Constraints, Usage
from ..schemas.generate import GenerateMetadata, GenerateRequest, GenerateResponse
from ..schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
)

logger = logging.getLogger(__name__)


def _constraint(c: Constraints | None) -> Constraint | None:
    return None if c is None else Constraint(kind=c.kind, spec=c.spec)


def _image_from_data_url(url: str) -> Any:
    from ..images import decode_image, image_bytes_from_field

    # The ingress enforced the byte and pixel limits; these only bound what reaches here
    # some other way (a server called in-process).
    return decode_image(image_bytes_from_field(url, max_bytes=1 << 30, param="image_url"))


def _usage(out: GenerationOutput) -> Usage:
    """A finished generation's usage; logged (counts and finish reason, never text), with
    the request's ID and key name (:func:`serve_apps.request_context.install_log_context`)."""
    logger.info(
        "generation finished: %d prompt tokens, %d generated, %s",
        out.prompt_tokens,
        out.completion_tokens,
        out.finish_reason,
    )
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )


class LLMServer:
    """Serves one model: OpenAI chat/completions and the constrained ``generate`` API.

    ``start()`` must be awaited once before use (adapters do it in their constructor /
    ``@modal.enter``). ``engine`` may be given directly (tests pass a fake);
    ``placement_group`` is the Ray placement group a replica holds for the engine's workers.
    """

    config_type: ClassVar[type[ModelConfig]] = ModelConfig

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

            from ..engines import create_llm_engine, resolve_model

            model = await asyncio.to_thread(resolve_model, self.config, self._settings)
            self.engine = create_llm_engine(
                self.config, model, placement_group=self._placement_group
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

    # ------------------------------------------------------------- requests
    def _sampling(self, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens or self.config.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stop_list()),
            seed=req.seed,
        )

    async def _chat_request(self, req: ChatCompletionRequest) -> GenerationRequest:
        has_images = any(m.has_images() for m in req.messages)
        if has_images and not self._engine.info().supports_images:
            raise UnsupportedError(
                f"model {self.config.served_model_name} does not take images", param="messages"
            )
        images: list[Any] = []
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if not m.has_images():
                messages.append({"role": role, "content": m.text()})
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
            constraint=_constraint(req.effective_constraints()),
            images=images,
            add_special_tokens=False,
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
        )

    # --------------------------------------------------------------- OpenAI
    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        gen = await self._chat_request(req)
        out = await self._engine.generate_full(gen)
        return ChatCompletionResponse(
            id=f"chatcmpl-{gen.request_id}",
            created=int(time.time()),
            model=self.config.served_model_name,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=out.text),
                    finish_reason=out.finish_reason,
                    constraint_satisfied=out.constraint_satisfied,
                )
            ],
            usage=_usage(out),
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        gen = await self._chat_request(req)
        created, rid = int(time.time()), f"chatcmpl-{gen.request_id}"
        model = self.config.served_model_name

        def chunk(delta: DeltaMessage, out: GenerationOutput | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[
                    ChatChunkChoice(
                        delta=delta,
                        finish_reason=out.finish_reason if out else None,
                        constraint_satisfied=out.constraint_satisfied if out else None,
                    )
                ],
            )

        outputs = self._engine.generate(gen)
        # The first output is awaited before anything is yielded, so a bad request
        # (constraint, context length) fails the call instead of a started stream.
        last = await anext(outputs)
        yield chunk(DeltaMessage(role="assistant", content=""))
        yield chunk(DeltaMessage(content=last.text), last)
        async for out in outputs:
            last = out
            yield chunk(DeltaMessage(content=out.text), out)
        if req.stream_options and req.stream_options.include_usage:
            yield ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=_usage(last)
            )

    def _completion(
        self, rid: str, created: int, out: GenerationOutput, usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=rid,
            created=created,
            model=self.config.served_model_name,
            choices=[
                CompletionChoice(
                    text=out.text,
                    finish_reason=out.finish_reason,
                    constraint_satisfied=out.constraint_satisfied,
                )
            ],
            usage=usage,
        )

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        gen = self._completion_request(req)
        out = await self._engine.generate_full(gen)
        return self._completion(f"cmpl-{gen.request_id}", int(time.time()), out, _usage(out))

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[CompletionResponse]:
        gen = self._completion_request(req)
        created, rid = int(time.time()), f"cmpl-{gen.request_id}"
        last: GenerationOutput | None = None
        async for out in self._engine.generate(gen):
            last = out
            yield self._completion(rid, created, out)
        if last is not None and req.stream_options and req.stream_options.include_usage:
            yield CompletionResponse(
                id=rid,
                created=created,
                model=self.config.served_model_name,
                choices=[],
                usage=_usage(last),
            )

    # ------------------------------------------------------------- codegen
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        constraint = _constraint(req.constraints)
        assert constraint is not None
        gen = GenerationRequest(
            prompt=req.prompt,
            sampling=SamplingParams(
                max_tokens=req.max_tokens or self.config.default_max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
            ),
            constraint=constraint,
            request_id=uuid.uuid4().hex,
        )
        t0 = time.perf_counter()
        out = await self._engine.generate_full(gen)
        seconds = time.perf_counter() - t0
        assert out.finish_reason is not None
        return GenerateResponse(
            generated_text=out.text,
            tokens_generated=out.completion_tokens,
            generation_time_ms=round(seconds * 1000, 3),
            constraint_satisfied=bool(out.constraint_satisfied),
            finish_reason=out.finish_reason,
            metadata=GenerateMetadata(
                model=self.config.served_model_name,
                constraint_type=constraint.kind,
                prompt_tokens=out.prompt_tokens,
                tokens_per_sec=round(out.completion_tokens / seconds, 2) if seconds > 0 else 0.0,
            ),
        )
