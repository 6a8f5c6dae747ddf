"""LLM engine on transformers, with continuous batching and llguidance constraints.

Requests are not served one after another. A scheduler thread owns the model and runs a
step loop over a *running batch*:

1. new requests are prefilled together (left-padded) and their KV caches merged into the
   running batch (left-padding the shorter side), so they join at the next step;
2. one decode step runs the whole batch through the model at once: one token per row,
   each row at its own position;
3. every row's logits are masked by its grammar (one parallel llguidance call for the
   batch), then the whole batch is sampled at once (:func:`sample_tokens`: one softmax,
   one top-p cut, one inverse-CDF lookup), each row with its own temperature, top-p and
   seeded random stream;
4. rows that finished (EOS, stop string, grammar complete, ``max_tokens``) or whose client
   went away leave the batch, and all-padding cache columns are trimmed.

The event loop never waits on the model: outputs are handed to each request's asyncio
queue with ``call_soon_threadsafe``.

What is specific to a model family lives in four hooks, so that a vision-language model
(:mod:`.transformers_vl`) reuses this scheduler instead of writing a second one:
``_load_model`` (the model class, and a processor), ``_prompt_inputs`` (a request's
token ids and extra tensors, made before it is queued), ``_prefill_kwargs`` (position ids
and extra inputs of a prefill batch) and ``_step_position_ids`` (positions of one decode
step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import EngineError, OverloadedError, ServeAppError
from ..service_time import ServiceShare, StepTimer
from .adapters import AdapterSource, PeftAdapters, unknown_adapter
from .base import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
    deadline_error,
    eos_token_ids,
)
from .constraints import (
    BatchMasker,
    ConstraintCompiler,
    constraint_satisfied,
    matcher_failure,
)
from .tokenized import TokenizedEngine

if TYPE_CHECKING:
    import llguidance
    import torch

logger = logging.getLogger(__name__)

_STOP = object()  # sentinel that stops the scheduler thread
_LOAD_LOCK = threading.Lock()  # see TransformersEngine.start


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Byte-level BPE can split one character over several tokens; a delta is released only
    once it no longer ends in a partial character (the approach of TGI and vLLM).
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


@dataclass
class PromptInputs:
    """A request's model inputs, made before it is queued (off the scheduler thread).

    ``extras`` holds model-specific tensors the prefill needs (e.g. ``pixel_values``);
    it is dropped once the request is prefilled. ``position_offset`` is added to the
    position of every generated token (multimodal RoPE: image tokens use fewer
    positions than they take in the sequence, so positions run behind token counts).
    """

    ids: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    position_offset: int = 0


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    inputs: PromptInputs
    matcher: llguidance.LLMatcher | None
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Any]
    detok: IncrementalDetokenizer
    rng: random.Random | None = None  # the row's own random stream (None: greedy)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    unsent_ids: list[int] = field(default_factory=list)
    n_ctx: int = 0  # real (non-padding) tokens in this row's KV cache
    next_token: int = -1  # sampled, not yet fed to the model
    seen: set[int] = field(default_factory=set)  # prompt + output ids, for repetition_penalty
    counts: Counter[int] = field(default_factory=Counter)  # output ids, for the OpenAI penalties
    token_mask: torch.Tensor | None = None  # allowed ids (bool over the vocabulary)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    share: ServiceShare = field(default_factory=ServiceShare)  # of the steps it was in
    final: GenerationOutput | None = None  # its last output, until the step is charged

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


def _constrained(seqs: list[_Sequence]) -> list[tuple[int, llguidance.LLMatcher]]:
    return [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]


def _deliver(items: list[tuple[_Sequence, Any]]) -> None:
    """On the event loop: put one step's outputs into their requests' queues."""
    for seq, item in items:
        seq.outputs.put_nowait(item)


@dataclass
class EngineStats:
    """Counters for tests and benchmarks (read-only outside the scheduler thread)."""

    decode_steps: int = 0
    prefill_batches: int = 0
    tokens_generated: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]
) -> list[int | None]:
    """One token per row of ``logits`` (batch, vocab; masked already), the whole batch at
    once: each row with its own temperature and top-p, and ``uniforms[i]`` (the row's draw
    in [0, 1) from its own seeded stream) picking the token by inverse CDF. ``None`` for a
    row with no finite logit (its request fails alone).

    Greedy rows take the argmax. Sampled rows are shifted so that their largest logit is 0
    and divided by the temperature, floored at 1e-30: a temperature of 1e-300 then sends
    every other logit to -inf (the greedy limit it means) instead of rounding to 0 in
    float32 and making 0 / 0; in float32 throughout (float64 over a 150k vocabulary costs
    more than the model's step on a CPU). The most likely token always survives top-p,
    whatever the precision of a tiny ``top_p``.
    """
    import torch

    top, tokens = logits.max(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([max(params[i].temperature, 1e-30) for i in sampled])
        shifted = logits.index_select(0, index) - top.index_select(0, index)[:, None]
        probs = torch.softmax(shifted / temps.to(logits.device)[:, None], dim=-1)
        top_p = [params[i].top_p for i in sampled]
        if min(top_p) < 1.0:
            limit = torch.tensor([p if p < 1.0 else math.inf for p in top_p])
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cut = (sorted_p.cumsum(-1) - sorted_p) >= limit.to(logits.device)[:, None]
            cut[:, 0] = False
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(cut, 0.0))
        cdf = probs.cumsum(-1)
        draws = torch.tensor([uniforms[i] for i in sampled])
        targets = draws.to(logits.device)[:, None] * cdf[:, -1:]
        picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=logits.shape[1] - 1)
        tokens = tokens.index_copy(0, index, picks[:, 0])
    finite = torch.isfinite(top).tolist()
    return [t if ok else None for t, ok in zip(tokens.tolist(), finite, strict=True)]


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


class TransformersEngine(TokenizedEngine):
    """A causal LM from ``from_pretrained(path_or_id)`` behind the engine contract."""

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
        adapters: Mapping[str, AdapterSource] | None = None,
        max_loaded_adapters: int = 4,
    ):
        super().__init__()
        self.model_name_or_path = model
        self.revision = revision
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._max_model_len_cfg = max_model_len
        self._dtype = dtype
        self._device_cfg = device
        self._trust_remote_code = trust_remote_code
        self.counters = EngineStats()
        self._waiting: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._info: ModelInfo | None = None
        self._dead: BaseException | None = None  # set when the scheduler thread has ended
        # Deltas of the current step, handed to the event loops together (_flush).
        self._outbox: list[tuple[_Sequence, GenerationOutput]] = []
        self._recorded_load: tuple[int, int] | None = None  # (queue depth, batch) last set
        # LoRA adapters (PEFT); requests waiting for one to be free to load (scheduler).
        self._adapters = PeftAdapters(adapters, max_loaded_adapters) if adapters else None
        self._held: list[_Sequence] = []

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # One load at a time per process: transformers resolves its lazily imported
        # modules on first use, and two threads doing that at once can fail with an
        # ImportError (seen with two engines starting together in one process).
        await asyncio.to_thread(self._load_locked)
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self._thread.start()

    def _load_locked(self) -> None:
        with _LOAD_LOCK:
            self._load()

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        device = self._device_cfg
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_name_or_path,
            revision=self.revision,
            trust_remote_code=self._trust_remote_code,
        )
        model = self._load_model().to(self.device)
        self.model = (self._adapters.wrap(model) if self._adapters else model).eval()
        self.compiler = ConstraintCompiler.for_hf_tokenizer(self.tokenizer)
        self.masker = BatchMasker(self.compiler.vocab_size)

        self._eos = set(
            eos_token_ids(
                getattr(self.model.generation_config, "eos_token_id", None),
                self.tokenizer.eos_token_id,
            )
        )
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        text_config = self.model.config.get_text_config()
        limit = getattr(text_config, "max_position_embeddings", None) or 2048
        max_len = min(self._max_model_len_cfg or limit, limit)
        self._info = ModelInfo(
            name_or_path=self.model_name_or_path,
            max_model_len=int(max_len),
            eos_token_ids=tuple(sorted(self._eos)),
            supports_images=self.supports_images,
            special_tokens=self._special_tokens(),
        )
        logger.info("loaded %s on %s (max_model_len=%d)", self.model_name_or_path, device, max_len)

    # ------------------------------------------------------- model-family hooks
    def _load_model(self) -> Any:
        """The model (on CPU; ``_load`` moves it). Subclasses load other model classes."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.model_name_or_path,
            revision=self.revision,
            dtype=_torch_dtype(self._dtype),
            trust_remote_code=self._trust_remote_code,
        )

    async def _prompt_inputs(self, request: GenerationRequest) -> PromptInputs:
        """Token ids (and extra tensors) of a request's prompt."""
        # In a worker thread: a long prompt must not stall the replica's event loop.
        return PromptInputs(
            await asyncio.to_thread(
                self._encode, request.prompt, add_special_tokens=request.add_special_tokens
            )
        )

    def _prefill_kwargs(self, seqs: list[_Sequence], attn: torch.Tensor) -> dict[str, Any]:
        """Model inputs of a left-padded prefill batch besides ids, mask and cache."""
        return {"position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}

    def _step_position_ids(self, batch: list[_Sequence]) -> torch.Tensor:
        """Positions of the tokens fed in one decode step, one per row."""
        import torch

        return torch.tensor(
            [[s.n_ctx + s.inputs.position_offset] for s in batch], device=self.device
        )

    def stats(self) -> dict[str, Any]:
        return {
            "decode_steps": self.counters.decode_steps,
            "prefill_batches": self.counters.prefill_batches,
            "tokens_generated": self.counters.tokens_generated,
            "max_batch_size": self.counters.max_batch_size,
            "batch_sizes": dict(self.counters.batch_sizes),
            "mask_seconds_median": self.masker.median_mask_seconds(),
            "constraint_cache": {"hits": self.compiler.hits, "misses": self.compiler.misses},
            # Rows in the running batch and requests waiting to join it, right now.
            "active": len(getattr(self, "_active", ())),
            "waiting": self._waiting.qsize() + len(self._held),
            "in_flight": len(getattr(self, "_active", ()))
            + self._waiting.qsize()
            + len(self._held),
            **({"adapters": self._adapters.stats()} if self._adapters else {}),
        }

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._waiting.put(_STOP)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ----------------------------------------------------------------- contract
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("engine not started")
        if self._dead is not None:
            # Health checks call this: a replica whose scheduler died must be replaced.
            raise EngineError(f"{self.model_name_or_path}: {self._dead}")
        return self._info

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._tok_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        seq = await self._prepare(request)
        if self._waiting.qsize() >= self.max_queue:
            raise OverloadedError(f"{self._waiting.qsize()} requests are waiting; retry later")
        self._waiting.put(seq)
        if self._dead is not None:  # the scheduler ended between the check and the put
            self._fail(self._drain_waiting(), self._dead)
        try:
            while True:
                item = await seq.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                # Deltas that piled up while the consumer was busy (a slow client, the
                # hops of a Serve graph) go out as one: one chunk to frame and send.
                pending, error = [item], None
                while item.finish_reason is None and not seq.outputs.empty():
                    following = seq.outputs.get_nowait()
                    if isinstance(following, BaseException):
                        error = following
                        break
                    item = following
                    pending.append(item)
                yield pending[0] if len(pending) == 1 else GenerationOutput.join(pending)
                if error is not None:
                    raise error
                if item.finish_reason is not None:
                    return
        finally:
            # Normal end, error, or the consumer closed us (client disconnected).
            seq.cancelled = True

    async def _prepare(self, request: GenerationRequest) -> _Sequence:
        """Everything that can reject a request, done before it is queued."""

        self._check_images(request)
        if request.adapter is not None:
            if self._adapters is None:
                raise unknown_adapter(request.adapter, ())
            self._adapters.check(request.adapter)
        self._check_prompt_length(request)
        inputs = await self._prompt_inputs(request)
        prompt_ids = inputs.ids
        matcher = await self._check_prompt(request, prompt_ids)
        rng = None
        if request.sampling.temperature > 0:
            rng = random.Random(request.sampling.seed)  # None: seeded from the OS
        skip_special = request.sampling.skip_special_tokens
        token_mask = None
        if request.sampling.has_token_mask:
            token_mask = self._token_mask(request.sampling)
        return _Sequence(
            token_mask=token_mask,
            request=request,
            prompt_ids=prompt_ids,
            inputs=inputs,
            matcher=matcher,
            loop=asyncio.get_running_loop(),
            outputs=asyncio.Queue(),
            detok=IncrementalDetokenizer(lambda ids: self._decode(ids, skip_special)),
            rng=rng,
            seen=set(prompt_ids) if request.sampling.repetition_penalty != 1.0 else set(),
        )

    def _token_mask(self, sp: SamplingParams) -> torch.Tensor:
        """The allowed ids of a token mask as a boolean row over the model's logits."""
        import torch

        width = max(self.compiler.vocab_size, int(self.model.config.get_text_config().vocab_size))
        if sp.allowed_token_ids is None:
            mask = torch.ones(width, dtype=torch.bool)
        else:
            mask = torch.zeros(width, dtype=torch.bool)
            mask[sorted(sp.allowed_token_ids)] = True
        if sp.forbidden_token_ids:
            mask[sorted(sp.forbidden_token_ids)] = False
        mask[sorted(self._eos)] = True  # generation can always end
        return mask.to(self.device)

    # ---------------------------------------------------------------- scheduler
    def _run(self) -> None:
        """The scheduler thread. Whatever ends it, no request is left waiting."""
        import torch

        self._active: list[_Sequence] = []
        self._cache: Any = None
        self._attn: torch.Tensor | None = None
        reason: BaseException = EngineError("the engine is shutting down")
        try:
            with torch.inference_mode():
                while True:
                    new = self._take_new()
                    if new is None:
                        break
                    self._step(new)
        except Exception as e:  # a bug in the loop itself: the engine is dead (logged here)
            logger.exception("the engine's scheduler died")
            reason = EngineError(f"the engine stopped: {e}")
        finally:
            self._flush()
            self._dead = reason
            self._fail([*self._active, *self._held, *self._drain_waiting()], reason)
            self._active, self._cache, self._attn = [], None, None

    def _step(self, new: list[_Sequence]) -> None:
        """One scheduler step; a failure fails only the requests it touched."""
        self._record_load()
        late = [s for s in self._active if not s.done and s.request.past_deadline()]
        if late:
            self._fail(late, deadline_error("while it was generating"))
        self._drop_finished()
        if new and self._adapters is not None:
            new = self._admit_adapters(new)
        if new:
            timer = StepTimer()
            try:
                self._prefill(new)
            except Exception as e:
                # The running batch is untouched until the merge at the end of a prefill
                # (e.g. out of memory on a large image batch): only the new rows fail.
                logger.exception("prefill failed; failing its %d new requests", len(new))
                self._fail(new, e)
            self._charge(timer, new)
            self._flush()  # first tokens out now, not after the decode step
        if self._active:
            timer, batch = StepTimer(), list(self._active)
            try:
                self._decode_step()
            except Exception as e:
                logger.exception("decode step failed; failing the running batch")
                self._fail(self._active, e)
                self._active, self._cache, self._attn = [], None, None
            self._charge(timer, batch)
            self._flush()

    @staticmethod
    def _charge(timer: StepTimer, rows: list[_Sequence]) -> None:
        """The step's time split equally across its rows (:mod:`serve_apps.service_time`);
        a row that finished in it gets its total on its last output (not yet flushed)."""
        timer.split(rows)
        for s in rows:
            if s.final is not None and s.final.service is None:
                s.final.service = ServiceShare(s.share.wall_s, s.share.cpu_s)

    def _flush(self) -> None:
        """Hand the step's deltas to their event loops: one wake-up per loop and step
        (``call_soon_threadsafe`` writes to the loop's self-pipe), not one per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, Any]]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                logger.warning("dropped %d outputs for a closed event loop", len(items))

    def _record_load(self) -> None:
        """The queue depth and running batch size gauges, set when they change (checked
        every step; setting them every step cost ~6% of a smoke-model step)."""
        load = (self._waiting.qsize(), len(self._active))
        if load == self._recorded_load:
            return
        self._recorded_load = load
        model = os.path.basename(str(self.model_name_or_path).rstrip("/"))
        metrics.set_gauge(metrics.ENGINE_QUEUE_DEPTH, load[0], model=model)
        metrics.set_gauge(metrics.ENGINE_BATCH_SIZE, load[1], model=model)

    @staticmethod
    def _fail(seqs: list[_Sequence], e: BaseException) -> None:
        err = e if isinstance(e, ServeAppError) else EngineError(f"generation failed: {e}")
        for seq in seqs:
            if not seq.done:
                seq.done = True
                seq.emit(err)

    def _drain_waiting(self) -> list[_Sequence]:
        drained: list[_Sequence] = []
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                return drained
            if item is not _STOP:
                drained.append(item)

    def _take_new(self) -> list[_Sequence] | None:
        """New sequences to admit; blocks while idle. None means shut down."""
        room = self.max_batch_size - len(self._active)
        # Requests held back for an adapter (see _admit_adapters) come first.
        new, self._held = self._held[:room], self._held[room:]
        block = not self._active
        while len(new) < room:
            try:
                item = self._waiting.get(block=block and not new)
            except queue.Empty:
                break
            if item is _STOP:
                return None
            if item.request.past_deadline():
                self._fail([item], deadline_error("while it waited for a slot in the batch"))
            elif not item.cancelled:
                new.append(item)
        return new

    def _prefill(self, new: list[_Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        longest = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), longest), self._pad_id, dtype=torch.long)
        attn = torch.zeros((len(new), longest), dtype=torch.long)
        for i, s in enumerate(new):
            n = len(s.prompt_ids)
            ids[i, longest - n :] = torch.tensor(s.prompt_ids)
            attn[i, longest - n :] = 1
            s.n_ctx = n
        ids, attn = ids.to(self.device), attn.to(self.device)
        extra = self._prefill_kwargs(new, attn)
        for s in new:
            s.inputs.extras = {}  # pixel values and the like are not needed after this
        cache = DynamicCache()
        model, adapter_kwargs = self._model_for(new)
        out = model(
            input_ids=ids,
            attention_mask=attn,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
            **adapter_kwargs,
        )
        self.counters.prefill_batches += 1
        self._sample(out.logits[:, -1, :].float(), new)
        keep = [i for i, s in enumerate(new) if not s.done]
        if not keep:
            return
        if len(keep) < len(new):
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
            attn = attn[keep]
        self._merge([new[i] for i in keep], out.past_key_values, attn)

    def _merge(self, seqs: list[_Sequence], cache: Any, attn: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        if self._cache is None or self._attn is None:
            self._active, self._cache, self._attn = list(seqs), cache, attn
            return
        t_old, t_new = self._attn.shape[1], attn.shape[1]
        width = max(t_old, t_new)

        def pad(x: torch.Tensor, t: int, dim_from_end: int) -> torch.Tensor:
            # F.pad pads trailing dims first: (0,0) per dim after the sequence dim.
            return F.pad(x, (0, 0) * (dim_from_end - 1) + (width - t, 0))

        layers = [
            (
                torch.cat([pad(a.keys, t_old, 2), pad(b.keys, t_new, 2)]),
                torch.cat([pad(a.values, t_old, 2), pad(b.values, t_new, 2)]),
            )
            for a, b in zip(self._cache.layers, cache.layers, strict=True)
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._attn = torch.cat([pad(self._attn, t_old, 1), pad(attn, t_new, 1)])
        self._active.extend(seqs)

    def _decode_step(self) -> None:
        import torch

        assert self._attn is not None
        batch = self._active
        ids = torch.tensor([[s.next_token] for s in batch], device=self.device)
        positions = self._step_position_ids(batch)
        attn = torch.cat(
            [self._attn, torch.ones((len(batch), 1), dtype=self._attn.dtype, device=self.device)], 1
        )
        model, adapter_kwargs = self._model_for(batch)
        out = model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            **adapter_kwargs,
        )
        self._attn = attn
        for s in batch:
            s.n_ctx += 1
        self.counters.decode_steps += 1
        self.counters.batch_sizes[len(batch)] += 1
        self._sample(out.logits[:, -1, :].float(), batch)

    # ----------------------------------------------------------------- adapters
    def _admit_adapters(self, new: list[_Sequence]) -> list[_Sequence]:
        """The new rows whose adapter is (now) loaded; the others are held back until a
        loaded adapter is free to make room (grouping instead of breaking the bound)."""
        assert self._adapters is not None
        in_use = {s.request.adapter for s in self._active if s.request.adapter is not None}
        admitted: list[_Sequence] = []
        for s in new:
            if s.cancelled:
                continue
            if s.request.past_deadline():
                self._fail([s], deadline_error("while it waited for its adapter to load"))
                continue
            name = s.request.adapter
            if name is None or self._adapters.acquire(name, in_use):
                admitted.append(s)
                if name is not None:
                    in_use.add(name)
                    self._adapters.requests[name] += 1
            else:
                self._held.append(s)
        return admitted

    def _model_for(self, seqs: list[_Sequence]) -> tuple[Any, dict[str, Any]]:
        """The model to run these rows through and the extra arguments: with adapters, the
        PEFT model with ``adapter_names`` (one per row), or the model without PEFT's layers
        when every row is for the base model (``PeftAdapters.forward_for``)."""
        if self._adapters is None:
            return self.model, {}
        return self._adapters.forward_for(s.request.adapter for s in seqs)

    def _drop_finished(self) -> None:
        """Remove finished or cancelled rows from the batch and trim all-padding columns."""
        import torch
        from transformers import DynamicCache

        if not self._active or self._attn is None:
            return
        keep = [i for i, s in enumerate(self._active) if not (s.done or s.cancelled)]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._attn = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        attn = self._attn.index_select(0, index)
        used = attn.sum(0).nonzero()
        first = int(used[0]) if len(used) else 0
        self._cache = DynamicCache(
            ddp_cache_data=[
                (
                    layer.keys.index_select(0, index)[:, :, first:],
                    layer.values.index_select(0, index)[:, :, first:],
                )
                for layer in self._cache.layers
            ]
        )
        self._attn = attn[:, first:]
        self._active = [self._active[i] for i in keep]

    # ----------------------------------------------------------------- sampling
    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> None:
        """Mask, sample and advance every row. A row that fails (its grammar hit a limit,
        its numbers went bad) fails its own request only; the batch goes on."""
        import torch

        # Logprobs come from the raw distribution, before anything below changes it.
        wants = [i for i, s in enumerate(seqs) if s.request.sampling.logprobs is not None]
        raw = torch.log_softmax(logits[wants], dim=-1) if wants else None
        for i, s in enumerate(seqs):
            sp = s.request.sampling
            penalty = sp.repetition_penalty
            if penalty != 1.0 and s.seen:
                seen = torch.tensor(sorted(s.seen), dtype=torch.long, device=logits.device)
                scores = logits[i].index_select(0, seen)
                scores = torch.where(scores < 0, scores * penalty, scores / penalty)
                logits[i].index_copy_(0, seen, scores)
            if (sp.presence_penalty or sp.frequency_penalty) and s.counts:
                ids = torch.tensor(list(s.counts), dtype=torch.long, device=logits.device)
                counts = torch.tensor(
                    list(s.counts.values()), dtype=logits.dtype, device=logits.device
                )
                logits[i].index_add_(0, ids, -(sp.presence_penalty + sp.frequency_penalty * counts))
            if s.token_mask is not None:
                width = min(logits.shape[1], s.token_mask.shape[0])
                logits[i, :width].masked_fill_(~s.token_mask[:width], float("-inf"))
                logits[i, width:] = float("-inf")
        for i, error in self.masker.apply(logits, _constrained(seqs)):
            self._fail([seqs[i]], error)
        live = [(i, s) for i, s in enumerate(seqs) if not s.done]
        if not live:
            return
        rows = logits.index_select(0, torch.tensor([i for i, _ in live], device=logits.device))
        params = [s.request.sampling for _, s in live]
        uniforms = [s.rng.random() if s.rng is not None else 0.0 for _, s in live]
        tokens: list[int | BaseException | None]
        try:
            tokens = list(sample_tokens(rows, params, uniforms))
        except Exception:  # a bug in one row's numbers: find it, fail it alone
            logger.exception("batched sampling failed; sampling row by row")
            tokens = [
                self._sample_alone(rows[k : k + 1], p, u)
                for k, (p, u) in enumerate(zip(params, uniforms, strict=True))
            ]
        for (i, s), token in zip(live, tokens, strict=True):
            if isinstance(token, BaseException):
                self._fail([s], token)
            elif token is None:
                self._fail([s], EngineError("the model produced no finite logit for this request"))
            else:
                try:
                    if raw is not None and s.request.sampling.logprobs is not None:
                        s.unsent_logprobs.append(
                            self._logprob(raw[wants.index(i)], token, s.request.sampling.logprobs)
                        )
                    self._advance(s, token)
                except Exception as e:
                    logger.exception("advancing one row failed; failing only its request")
                    self._fail([s], e)

    @staticmethod
    def _sample_alone(
        row: torch.Tensor, params: SamplingParams, uniform: float
    ) -> int | BaseException | None:
        try:
            return sample_tokens(row, [params], [uniform])[0]
        except Exception as e:
            return e

    def _logprob(self, row: torch.Tensor, token: int, top: int) -> TokenLogprob:
        def value(x: Any) -> float:
            v = float(x)
            return v if v > -9999.0 else -9999.0  # OpenAI's floor; JSON has no -inf

        alternatives: tuple[tuple[str, float], ...] = ()
        if top:
            best = row.topk(top)
            alternatives = tuple(
                (self.token_text(int(t)), value(lp))
                for lp, t in zip(best.values, best.indices, strict=True)
            )
        return TokenLogprob(self.token_text(token), value(row[token]), alternatives)

    def _advance(self, s: _Sequence, token: int) -> None:
        """Record one sampled token for ``s``, decide whether it is finished, emit a delta."""
        sp = s.request.sampling
        s.generated.append(token)
        s.unsent_ids.append(token)
        if sp.repetition_penalty != 1.0:
            s.seen.add(token)
        if sp.presence_penalty or sp.frequency_penalty:
            s.counts[token] += 1
        s.next_token = token
        self.counters.tokens_generated += 1
        finish: FinishReason | None = None
        satisfied: bool | None = None
        is_eos = token in self._eos
        if s.matcher is not None and not s.matcher.consume_token(token):
            self._fail([s], matcher_failure(s.matcher))
            return
        if is_eos:
            finish = "stop"
        else:
            s.text += s.detok.add(token)
            if sp.stop:
                start = max(0, s.sent_chars - max(len(x) for x in sp.stop))
                hits = [i for i in (s.text.find(x, start) for x in sp.stop) if i >= 0]
                if hits:
                    s.text = s.text[: min(hits)]
                    finish = "stop"
        if finish is None and s.matcher is not None and s.matcher.is_stopped():
            finish = "stop"
        if finish is None and len(s.generated) >= sp.max_tokens:
            finish = "length"
        if s.matcher is not None and finish is not None:
            by_string = finish == "stop" and not is_eos and not s.matcher.is_stopped()
            satisfied = constraint_satisfied(s.matcher, stopped_by_string=by_string)
        if finish is not None:
            s.done = True
            hold = 0
        else:
            hold = max((len(x) for x in sp.stop), default=1) - 1
        upto = max(s.sent_chars, len(s.text) - hold)
        delta = s.text[s.sent_chars : upto]
        if delta or finish is not None:
            s.sent_chars = upto
            out = GenerationOutput(
                text=delta,
                token_ids=s.unsent_ids,
                prompt_tokens=len(s.prompt_ids),
                completion_tokens=len(s.generated),
                finish_reason=finish,
                constraint_satisfied=satisfied,
                logprobs=s.unsent_logprobs if sp.logprobs is not None else None,
            )
            if finish is not None:
                s.final = out
            self._outbox.append((s, out))
            s.unsent_ids = []
            s.unsent_logprobs = []
