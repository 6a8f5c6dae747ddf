"""The LLM engine contract. Engines import no serving framework (no ray, no modal).

An engine turns one :class:`GenerationRequest` into a stream of :class:`GenerationOutput`
deltas. The contract, which every engine (transformers, vLLM, the test fake) keeps:

Streaming (:meth:`LLMEngine.generate`)
    Yields one or more ``GenerationOutput`` objects. Each carries only the *new* text and
    token ids since the previous one; every output but the last has some text (ids whose
    text is held back, e.g. a partial UTF-8 character, ride on the next output). Exactly the
    last one has ``finish_reason`` set (``"stop"``: EOS, a stop string, or the constraint
    completed; ``"length"``: ``max_tokens`` reached).
    ``prompt_tokens``/``completion_tokens`` are running totals. When a constraint was given,
    the last output's ``constraint_satisfied`` says whether the full text matches it; it is
    True whenever ``finish_reason == "stop"`` because of EOS or the constraint ending, and
    honestly False when ``max_tokens`` cut it short. Stop strings are not part of the text.

Not streaming (:meth:`LLMEngine.generate_full`)
    Drains :meth:`generate` into one ``GenerationOutput`` with the whole text.

Errors
    Problems with the request raise a :class:`serve_apps.errors.ServeAppError` subclass
    *before the first output is yielded* (``ConstraintError`` for a schema/regex/grammar that
    does not compile, ``ContextLengthError`` when prompt + ``max_tokens`` do not fit,
    ``UnsupportedError`` for images sent to a text-only model, ``OverloadedError`` when the
    queue is full). A failure of the model mid-stream raises ``EngineError``.

Cancellation
    Closing the async iterator (the client went away) aborts the request and frees its slot
    in the running batch.

Deadlines
    ``GenerationRequest.deadline`` (wall-clock seconds; by default the current request's,
    :mod:`serve_apps.request_context`) is a promise nobody waits past: a request still
    queued when it passes never starts, and one still generating is stopped; either way
    the stream raises ``DeadlineExceededError`` and the slot is free again.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

from ..errors import ContextLengthError, DeadlineExceededError
from ..request_context import current
from ..service_time import ServiceShare

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .adapters import AdapterSource

FinishReason = Literal["stop", "length"]
ConstraintKind = Literal["json_schema", "regex", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """A structural constraint on the output. ``spec`` is a JSON-schema dict or a string."""

    kind: ConstraintKind
    spec: str | dict[str, Any]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # HF/vLLM semantics: logits of every token already in the prompt or the output are
    # divided (positive) or multiplied (negative) by this. Rex-Omni decodes with 1.05.
    repetition_penalty: float = 1.0
    # False keeps special tokens in the text (Rex-Omni's output format is made of them).
    skip_special_tokens: bool = True
    # OpenAI semantics: subtracted from the logit of every token already generated, once
    # (presence) or once per occurrence (frequency); the prompt does not count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Log-probabilities of each sampled token and of this many most likely alternatives
    # (0: the sampled token only); None: none. From the model's raw distribution (before
    # penalties, constraints and temperature), as vLLM reports them by default.
    logprobs: int | None = None
    # A token mask: only these ids may be sampled (None: any), and never these. EOS stays
    # allowed so that generation can end.
    allowed_token_ids: frozenset[int] | None = None
    forbidden_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not self.temperature >= 0.0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def has_token_mask(self) -> bool:
        return self.allowed_token_ids is not None or bool(self.forbidden_token_ids)


@dataclass
class GenerationRequest:
    """A prompt (already templated) plus how to sample it."""

    prompt: str
    sampling: SamplingParams
    constraint: Constraint | None = None
    # Images for vision-language engines (PIL images, one per image placeholder in the
    # templated prompt, in order); text-only engines reject them.
    images: Sequence[Any] = ()
    # Chat prompts come out of the chat template with their special tokens already in.
    add_special_tokens: bool = True
    # The LoRA adapter (its served name) this request runs with; None: the base model.
    adapter: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Wall-clock time (time.time()) past which nobody waits for the answer; None: never.
    deadline: float | None = field(default_factory=lambda: _current_deadline())

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def _current_deadline() -> float | None:
    meta = current()
    return None if meta is None else meta.deadline


def deadline_error(where: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"the request's deadline passed {where}; its work was stopped")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives'."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationOutput:
    """A delta of generated text (or, from ``generate_full``, the whole of it).

    ``logprobs`` (when the request asked for them) has one entry per id in ``token_ids``.
    ``service`` (the last output only, from engines that measure it): the request's share
    of the engine's steps (:mod:`serve_apps.service_time`).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    constraint_satisfied: bool | None = None
    logprobs: list[TokenLogprob] | None = None
    service: ServiceShare | None = None

    @classmethod
    def join(cls, outputs: Sequence[GenerationOutput]) -> GenerationOutput:
        """Consecutive deltas as one: their text and ids in order, the last one's counts
        and verdict."""
        last = outputs[-1]
        return cls(
            text="".join(o.text for o in outputs),
            token_ids=[i for o in outputs for i in o.token_ids],
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            constraint_satisfied=last.constraint_satisfied,
            logprobs=(
                [lp for o in outputs for lp in o.logprobs or ()]
                if last.logprobs is not None
                else None
            ),
            service=last.service,
        )


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows about the loaded model once it has started."""

    name_or_path: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    supports_images: bool = False
    # Tokens (text form) a grammar must name as tokens (``<|im_end|>``), not as quoted
    # strings, to match them: the constraint backend's special tokens.
    special_tokens: frozenset[str] = frozenset()


class LLMEngine(abc.ABC):
    """Base class of every LLM engine; see the module docstring for the contract."""

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        model: str,
        *,
        placement_group: Any = None,
        adapters: Mapping[str, AdapterSource] | None = None,
    ) -> Self:
        """The engine for a model config and its resolved ``model`` id or path.

        Engines with options of their own override this; ``placement_group`` is what the
        serving target reserved for an engine's workers (only vLLM uses it); ``adapters``
        the config's LoRA adapters with their resolved paths (engines that serve them).
        """
        options = common_options(config)
        if adapters:
            options.update(adapters=adapters, max_loaded_adapters=config.max_loaded_adapters)
        return cls(model, **options)  # type: ignore[call-arg]

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Called once before any other method."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Facts about the loaded model (valid after :meth:`start`)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """Render chat messages into the prompt string the model expects.

        ``content`` is a string, or (for engines whose ``info().supports_images``) a list
        of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}``; each image part
        becomes the model's image placeholder, filled by ``GenerationRequest.images``.
        """

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens ``text`` encodes to."""

    @abc.abstractmethod
    async def validate_constraint(self, constraint: Constraint) -> None:
        """Raise ``ConstraintError`` (with the compiler's message) if it does not compile."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream deltas for ``request`` (an async generator)."""

    async def generate_full(self, request: GenerationRequest) -> GenerationOutput:
        outputs = [out async for out in self.generate(request)]
        assert outputs and outputs[-1].finish_reason is not None, "engine broke the contract"
        return GenerationOutput.join(outputs)

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks. Engines report at least ``tokens_generated``
        (since start) and ``in_flight`` (requests not yet finished, cancelled ones until
        they have left the engine). Default: none."""
        return {}

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, GPU memory). Default: nothing to release."""


def common_options(config: ModelConfig) -> dict[str, Any]:
    """The engine options every backend takes from its model config."""
    return {
        "revision": config.revision,
        "max_batch_size": config.max_batch_size,
        "max_queue": config.max_queue,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "device": config.device,
        "trust_remote_code": config.trust_remote_code,
    }


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """``ContextLengthError`` when prompt + ``max_tokens`` do not fit (every engine, one text)."""
    budget = prompt_tokens + max_tokens
    if budget > max_model_len:
        raise ContextLengthError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {budget} exceeds "
            f"the model's context of {max_model_len} tokens",
            param="max_tokens",
        )


def eos_token_ids(*sources: Any) -> tuple[int, ...]:
    """Every end-of-sequence id named by the sources (ints, lists of ints or None): a
    model's generation config may list several, its tokenizer names one."""
    found: set[int] = set()
    for source in sources:
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if token is not None:
                found.add(int(token))
    return tuple(sorted(found))
