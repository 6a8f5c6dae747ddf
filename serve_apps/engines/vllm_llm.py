"""LLM engine on vLLM (``backend: vllm``): the production engine behind the same contract.

Built on vLLM's public async engine API (``AsyncEngineArgs`` -> ``AsyncLLM``), which does
continuous batching, paged attention and structured outputs in its own processes. This
module adapts it to :mod:`serve_apps.engines.base`:

- prompts are tokenized here (the same tokenizer vLLM loads) and sent as token ids, so
  prompt/context checks and ``prompt_tokens`` are exact and raise before the first output;
- outputs are requested as deltas (``RequestOutputKind.DELTA``); vLLM excludes stop strings
  from the text and holds back text that may start one;
- constraints go to vLLM as ``StructuredOutputsParams(json=|regex=|grammar=)`` with the
  llguidance ("guidance") backend chosen for the whole engine and compact JSON
  (``disable_any_whitespace``, the same default as :data:`constraints.JSON_DEFAULTS`).
  vLLM's guidance backend turns them into llguidance grammars with the same calls the
  transformers engine uses (``grammar_from_json_schema``, ``grammar_from_regex``,
  ``grammar_from("grammar", ...)``), so a schema, regex or grammar means the same on both;
- every constraint is also compiled here by :class:`ConstraintCompiler` (cached by content
  hash), so an invalid one fails before the request reaches vLLM with the same message as
  on the transformers backend, and so that ``constraint_satisfied`` can be decided
  honestly: vLLM does not expose its matcher, so the finished token ids are replayed
  through our own matcher (microseconds per token);
- closing the iterator (client disconnect) closes vLLM's generator, which aborts the
  request in the engine core and frees its KV blocks;
- LoRA adapters (``ModelConfig.adapters``) map onto vLLM's own LoRA support: the engine
  starts with ``enable_lora`` (``max_loras``: adapters in one batch on the GPU,
  ``max_cpu_loras``: all of them kept in host memory), and a request for an adapter
  carries its ``LoRARequest`` (a stable integer id per adapter, in config order);
  :func:`lora_engine_args` and :func:`lora_request_args` are that mapping.

vLLM is imported only when this engine starts, and only if the config selects it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Self

from ..errors import (
    ConstraintError,
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    ServeAppError,
)
from .adapters import unknown_adapter
from .base import (
    Constraint,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
    check_context,
    common_options,
    deadline_error,
    eos_token_ids,
)
from .constraints import JSON_DEFAULTS, ConstraintCompiler, constraint_satisfied
from .tokenized import TokenizedEngine

if TYPE_CHECKING:
    import llguidance

    from ..config import ModelConfig
    from .adapters import AdapterSource

logger = logging.getLogger(__name__)


def _structured_outputs(constraint: Constraint) -> Any:
    """``StructuredOutputsParams`` for a constraint (the kinds map one to one)."""
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_schema":
        return StructuredOutputsParams(json=constraint.spec)
    if constraint.kind == "regex":
        return StructuredOutputsParams(regex=str(constraint.spec))
    return StructuredOutputsParams(grammar=str(constraint.spec))


def _client_error(e: Exception, constraint: Constraint | None = None) -> ServeAppError:
    """Map vLLM's request errors (``VLLMClientError``) onto ours, keeping vLLM's message."""
    message = str(e)
    param = getattr(e, "parameter", None)
    lowered = message.lower()
    if constraint is not None and (
        (param or "").startswith("structured_output")
        or "grammar" in lowered
        or "structured output" in lowered
    ):
        return ConstraintError(message, param=constraint.kind)
    if "context length" in lowered or "maximum model length" in lowered:
        return ContextLengthError(message, param=param or "max_tokens")
    return InvalidRequestError(message, param=param)


def _allowed_token_ids(
    sp: SamplingParams, vocab_size: int, eos: tuple[int, ...]
) -> list[int] | None:
    """A token mask as vLLM's ``allowed_token_ids`` (it has no forbidden list): allowed
    (or the whole vocabulary) minus forbidden, EOS kept so generation can end."""
    if not sp.has_token_mask:
        return None
    allowed = set(range(vocab_size)) if sp.allowed_token_ids is None else set(sp.allowed_token_ids)
    return sorted((allowed - sp.forbidden_token_ids) | set(eos))


def _logprobs(
    sampled: list[int], entries: Any, top: int, text: Callable[[int], str]
) -> list[TokenLogprob]:
    """vLLM's per-token ``{id: Logprob}`` dicts (the sampled id plus the ``top`` best,
    each with its ``rank``) as the engine contract's entries."""
    result: list[TokenLogprob] = []
    for token, entry in zip(sampled, entries or (), strict=False):

        def name(i: int, e: Any) -> str:
            return e.decoded_token if e.decoded_token is not None else text(i)

        chosen = entry[token]
        best = sorted(
            ((i, e) for i, e in entry.items() if e.rank is not None and e.rank <= top),
            key=lambda ie: ie[1].rank,
        )[:top]
        result.append(
            TokenLogprob(
                name(token, chosen),
                max(float(chosen.logprob), -9999.0),
                tuple((name(i, e), max(float(e.logprob), -9999.0)) for i, e in best),
            )
        )
    return result


def _satisfied(
    matcher: llguidance.LLMatcher, token_ids: list[int], stopped_by_string: bool
) -> tuple[bool, bool]:
    """(``constraint_satisfied``, grammar complete) for the generated tokens.

    vLLM masked every step with the same grammar, so the replay only fails if something
    is badly wrong; then we do not vouch for the text.
    """
    for token in token_ids:
        if matcher.is_stopped():
            break  # the EOS after a complete grammar
        if not matcher.consume_token(token):
            logger.error("generated token %d rejected on replay: %s", token, matcher.get_error())
            return False, False
    return constraint_satisfied(matcher, stopped_by_string), matcher.is_stopped()


def lora_engine_args(
    adapters: Mapping[str, AdapterSource], max_loaded: int, max_rank: int
) -> dict[str, Any]:
    """vLLM engine args that serve ``adapters`` (none: LoRA stays off)."""
    if not adapters:
        return {}
    return {
        "enable_lora": True,
        # Adapters in one batch (GPU slots); the others wait in host memory.
        "max_loras": min(max_loaded, len(adapters)),
        "max_cpu_loras": len(adapters),
        "max_lora_rank": max_rank,
    }


def lora_request_args(adapters: Mapping[str, AdapterSource]) -> dict[str, dict[str, Any]]:
    """Adapter name -> ``LoRARequest`` arguments: a stable id (1, 2, ... in config order;
    vLLM keys its adapter cache by it) and the weights' path."""
    return {
        name: {"lora_name": name, "lora_int_id": i, "lora_path": source.path}
        for i, (name, source) in enumerate(adapters.items(), start=1)
    }


def local_adapter_path(source: AdapterSource) -> str:
    """A local directory for an adapter: its path, or its Hub id downloaded at ``revision``
    (vLLM itself downloads Hub adapters without a revision)."""
    if os.path.isdir(source.path):
        return source.path
    from huggingface_hub import snapshot_download

    return str(snapshot_download(source.path, revision=source.revision))


def _ray_stat_loggers() -> list[Any] | None:
    """vLLM's own stats, where they reach the same exporter as ours: in a Ray Serve replica
    (``serve_apps.metrics`` on its Ray backend), vLLM's ``RayPrometheusStatLogger`` records
    them through Ray's metrics. Elsewhere they stay off (vLLM's default logger writes to
    prometheus_client's global registry, which no ``/metrics`` of ours serves)."""
    from .. import metrics

    if metrics.exports_http():
        return None
    try:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:  # a vLLM without it: no stats rather than no engine
        return None
    return [RayPrometheusStatLogger]


class VLLMEngine(TokenizedEngine):
    """A causal LM served by vLLM's ``AsyncLLM`` behind the engine contract."""

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        model: str,
        *,
        placement_group: Any = None,
        adapters: Mapping[str, AdapterSource] | None = None,
    ) -> Self:
        opts = config.vllm_options
        return cls(
            model,
            **common_options(config),
            **cls._family_options(config),
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            kv_cache_memory_bytes=opts.kv_cache_memory_bytes,
            quantization=opts.quantization,
            enforce_eager=opts.enforce_eager,
            placement_group=placement_group,
            adapters=adapters,
            max_loaded_adapters=config.max_loaded_adapters,
            max_lora_rank=config.max_lora_rank,
        )

    @classmethod
    def _family_options(cls, config: ModelConfig) -> dict[str, Any]:
        """Constructor options of a model family's subclass (the vision one's pixel budget)."""
        return {}

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        max_batch_size: int = 8,
        max_queue: int = 256,
        max_model_len: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        quantization: str | None = None,
        enforce_eager: bool = False,
        placement_group: Any = None,
        adapters: Mapping[str, AdapterSource] | None = None,
        max_loaded_adapters: int = 4,
        max_lora_rank: int = 16,
    ):
        super().__init__()
        self.adapters = dict(adapters or {})
        self._lora_requests: dict[str, Any] = {}  # name -> LoRARequest (made at start)
        self.model_name_or_path = model
        self.revision = revision
        self._trust_remote_code = trust_remote_code
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._device = device
        self._placement_group = placement_group
        engine_kwargs: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "tokenizer_revision": revision,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "max_num_seqs": max_batch_size,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "quantization": quantization,
            "enforce_eager": enforce_eager,
            "disable_log_stats": True,
            # One backend for the whole engine (vLLM rejects per-request choices): llguidance,
            # the library the transformers engine masks with. JSON without free whitespace,
            # as constraints.JSON_DEFAULTS; a schema can opt back in with x-guidance.
            "structured_outputs_config": {
                "backend": "guidance",
                "disable_any_whitespace": not JSON_DEFAULTS["whitespace_flexible"],
            },
        }
        engine_kwargs.update(lora_engine_args(self.adapters, max_loaded_adapters, max_lora_rank))
        if gpu_memory_utilization is not None:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if placement_group is not None and device != "cpu":
            # Inside a Ray Serve replica that holds a placement group, vLLM's Ray executor
            # puts one worker on each of its GPU bundles (as Ray Serve LLM does). vLLM's
            # CPU platform has no Ray executor (vllm-project/vllm#21602): there the
            # bundles only reserve CPUs and the default multiprocessing executor runs.
            engine_kwargs["distributed_executor_backend"] = "ray"
        self.engine_args = engine_kwargs
        self._llm: Any = None
        self._info: ModelInfo | None = None
        self._inflight = 0
        self.tokens_generated = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # Engine workers must be spawned, not forked: CUDA cannot be re-initialised in a
        # forked subprocess (vllm-project/vllm#7151, #8893, #12754), and a fork of a Ray
        # actor inherits its Ray connection (vllm-project/vllm#14705, #14768). vLLM forces
        # spawn itself when it detects Ray or initialised CUDA; setting it here makes it
        # hold wherever the engine runs. setdefault: an operator's explicit choice wins.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # Imported here, on the caller's thread: first imports of vLLM/transformers' lazy
        # modules from several threads at once are not safe.
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(self.engine_args)
        # Typed, as the field is declared (EngineArgs converts some config dicts, not this).
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **kwargs["structured_outputs_config"]
        )
        # Building the engine blocks for seconds (it starts the engine-core process and
        # loads the model); AsyncLLM starts its output handler lazily on the first request
        # when it is built outside the event loop.
        self._llm = await asyncio.to_thread(
            self._build, AsyncEngineArgs(**kwargs), UsageContext.ENGINE_CONTEXT, AsyncLLM
        )
        self._load_tokenizer_facts()
        if self.adapters:
            from vllm.lora.request import LoRARequest

            for name, args in lora_request_args(self.adapters).items():
                path = await asyncio.to_thread(local_adapter_path, self.adapters[name])
                self._lora_requests[name] = LoRARequest(**{**args, "lora_path": path})

    def _build(self, args: Any, usage_context: Any, async_llm: Any) -> Any:
        vllm_config = args.create_engine_config(usage_context)
        if self._placement_group is not None and self._device != "cpu":
            # The engine core runs in a spawned process that cannot see the replica's
            # placement group; hand it over explicitly, as Ray Serve LLM does
            # (vllm-project/vllm#14705; the V1 Ray executor otherwise loses the group:
            # vllm-project/vllm#29688, ray-project/ray#59064).
            vllm_config.parallel_config.placement_group = self._placement_group
        stat_loggers = _ray_stat_loggers()
        return async_llm.from_vllm_config(
            vllm_config, stat_loggers=stat_loggers, disable_log_stats=stat_loggers is None
        )

    def _load_tokenizer_facts(self) -> None:
        self.tokenizer = self._llm.get_tokenizer()
        self.compiler = ConstraintCompiler.for_hf_tokenizer(self.tokenizer)
        model_config = self._llm.model_config
        self._info = ModelInfo(
            name_or_path=self.model_name_or_path,
            max_model_len=int(model_config.max_model_len),
            eos_token_ids=eos_token_ids(
                self.tokenizer.eos_token_id,
                model_config.try_get_generation_config().get("eos_token_id"),
            ),
            supports_images=self.supports_images,
            special_tokens=self._special_tokens(),
        )
        logger.info(
            "vLLM engine ready: %s (max_model_len=%d)",
            self.model_name_or_path,
            self._info.max_model_len,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "tokens_generated": self.tokens_generated,
            "requests_unfinished": self._llm.get_num_unfinished_requests() if self._llm else 0,
            "in_flight": self._llm.get_num_unfinished_requests() if self._llm else 0,
            "constraint_cache": {"hits": self.compiler.hits, "misses": self.compiler.misses},
            "worker_multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
        }

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Stops the engine-core and worker processes (SIGTERM, then a grace period of
            # a few seconds). Called on the event loop on purpose: AsyncLLM.shutdown then
            # cancels its output handler before that task sees the engine core go away
            # (from another thread the handler logs a spurious EngineDeadError).
            llm.shutdown()

    # ----------------------------------------------------------------- contract
    def info(self) -> ModelInfo:
        if self._info is None or self._llm is None:
            raise RuntimeError("engine not started")
        if self._llm.errored:
            # The engine-core process died (e.g. OOM-killed); health checks see it here.
            raise EngineError("the vLLM engine core is dead")
        return self._info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from vllm.exceptions import VLLMClientError

        engine_input, prompt_tokens, sampling, matcher = await self._prepare(request)
        if self._inflight >= self.max_batch_size + self.max_queue:
            raise OverloadedError(f"{self._inflight} requests are in the engine; retry later")
        self._inflight += 1
        stream = self._llm.generate(
            engine_input,
            sampling,
            request.request_id,
            lora_request=self._lora_requests.get(request.adapter or ""),
        )
        generated: list[int] = []
        unsent: list[int] = []  # token ids whose text vLLM holds back (partial UTF-8, stops)
        unsent_logprobs: list[TokenLogprob] = []
        top = request.sampling.logprobs
        finished = False
        try:
            while True:
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    break
                except VLLMClientError as e:
                    if generated:
                        raise EngineError(f"generation failed: {e}") from e
                    # Request validation in vLLM's frontend: nothing was generated yet.
                    raise _client_error(e, request.constraint) from e
                except Exception as e:
                    # EngineDeadError, EngineGenerateError, anything from the engine core.
                    logger.exception("vLLM request %s failed", request.request_id)
                    raise EngineError(f"generation failed: {e}") from e
                if request.past_deadline():  # closing the stream aborts it in vLLM
                    raise deadline_error("while it was generating")
                completion = out.outputs[0]
                new_ids = list(completion.token_ids)
                generated.extend(new_ids)
                self.tokens_generated += len(new_ids)
                finish: FinishReason | None = None
                satisfied: bool | None = None
                if out.finished:
                    finished = True
                    finish, satisfied = self._finish(completion, generated, matcher)
                unsent.extend(new_ids)
                if top is not None:
                    unsent_logprobs += _logprobs(new_ids, completion.logprobs, top, self.token_text)
                # Like the transformers engine: a delta only when there is text or an end,
                # so a stream never carries empty chunks; held-back ids ride on the next one.
                if completion.text or finish is not None:
                    yield GenerationOutput(
                        text=completion.text,
                        token_ids=unsent,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=len(generated),
                        finish_reason=finish,
                        constraint_satisfied=satisfied,
                        logprobs=unsent_logprobs if top is not None else None,
                    )
                    unsent = []
                    unsent_logprobs = []
                if finish is not None:
                    return
            if not finished:
                raise EngineError("vLLM ended the request without finishing it")
        finally:
            self._inflight -= 1
            # Normal end: a no-op. Consumer closed us (client gone) or an error: closing
            # vLLM's generator raises GeneratorExit inside it, which aborts the request in
            # the engine core (AsyncLLM.generate's own cleanup).
            await stream.aclose()

    def _finish(
        self,
        completion: Any,
        generated: list[int],
        matcher: llguidance.LLMatcher | None,
    ) -> tuple[FinishReason, bool | None]:
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            # "abort" (someone aborted it in the engine) or anything new: not a finish
            # the contract knows, and the client did not ask for it.
            raise EngineError(f"vLLM finished the request with reason {reason!r}")
        finish: FinishReason = "stop" if reason == "stop" else "length"
        if matcher is None:
            return finish, None
        stopped_by_string = finish == "stop" and isinstance(completion.stop_reason, str)
        satisfied, complete = _satisfied(matcher, generated, stopped_by_string)
        if finish == "length" and complete:
            # The grammar ended on the last allowed token; vLLM would have sampled EOS
            # next. The transformers engine ends right there with "stop": so do we.
            finish = "stop"
        return finish, satisfied

    async def _engine_input(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> tuple[Any, int]:
        """vLLM's input for a request whose prompt encodes to ``prompt_ids``, and the
        prompt's length as the model sees it. Here: the token ids, already tokenized, as a
        rendered engine input (vLLM 0.33 deprecates raw prompts, token-id dicts included);
        the vision subclass adds images."""
        from vllm.inputs import tokens_input

        return tokens_input(prompt_ids, prompt=request.prompt), len(prompt_ids)

    async def _prepare(self, request: GenerationRequest) -> tuple[Any, int, Any, Any]:
        """Everything that can reject a request, done before it reaches vLLM: vLLM's input,
        the prompt's length in tokens, vLLM's sampling parameters and our matcher."""
        if request.adapter is not None and request.adapter not in self.adapters:
            raise unknown_adapter(request.adapter, self.adapters)
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        self._check_images(request)
        self._check_prompt_length(request)
        prompt_ids = await asyncio.to_thread(
            self._encode, request.prompt, add_special_tokens=request.add_special_tokens
        )
        # The same checks as the transformers backend (vLLM itself would take a max_tokens
        # beyond the context and stop early), and our compile of the constraint: the same
        # errors and messages, and the matcher that replays the output for
        # constraint_satisfied.
        matcher = await self._check_prompt(request, prompt_ids)
        engine_input, prompt_tokens = await self._engine_input(request, prompt_ids)
        if prompt_tokens != len(prompt_ids):  # images expanded to their tokens
            check_context(prompt_tokens, request.sampling.max_tokens, self.info().max_model_len)
        sp = request.sampling
        try:
            sampling = VLLMSamplingParams(
                max_tokens=sp.max_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                stop=list(sp.stop) or None,
                seed=sp.seed,
                repetition_penalty=sp.repetition_penalty,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                logprobs=sp.logprobs,
                allowed_token_ids=_allowed_token_ids(
                    sp, self.compiler.vocab_size, self.info().eos_token_ids
                ),
                skip_special_tokens=sp.skip_special_tokens,
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=(
                    _structured_outputs(request.constraint) if request.constraint else None
                ),
            )
        except VLLMClientError as e:
            raise _client_error(e, request.constraint) from e
        return engine_input, prompt_tokens, sampling, matcher
