"""Constraints with llguidance: compile once per content hash, mask logits token by token.

A constraint (JSON schema, regex, Lark/GBNF grammar) compiles into an ``LLMatcher`` bound to
the engine's tokenizer. Compiling is the expensive part (milliseconds to a second for big
schemas), so compiled matchers are kept in an LRU keyed by the SHA-256 of the constraint's
canonical text, and each request gets a cheap ``deep_copy`` of the cached one.

During decoding, :class:`BatchMasker` computes the allowed-token bitmask of every
constrained row of the batch in one parallel llguidance call, in a helper thread while
the model's forward pass runs, and sets the logits of disallowed tokens to ``-inf`` before
sampling, so the sampled text can only follow the grammar.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..errors import ConstraintError
from .base import Constraint

if TYPE_CHECKING:
    import llguidance
    import torch


def constraint_key(constraint: Constraint) -> str:
    """Content hash of a constraint; equal specs (key order aside) share a compiled matcher."""
    spec = constraint.spec
    text = (
        spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, separators=(",", ":"))
    )
    return hashlib.sha256(f"{constraint.kind}\0{text}".encode()).hexdigest()


# What a constraint may cost llguidance (its own limits: the grammar's size and the work
# of building the first lexer state). Without them a 10,000-property schema compiles for
# tens of seconds and a 20,000-way alternative for seconds; with them both fail in well
# under a second, while every constraint this project uses (the Rex-Omni detection
# grammar for 32 categories, 1,000-property schemas) compiles as before.
MAX_GRAMMAR_SIZE = 20_000
INITIAL_LEXER_FUEL = 100_000


def _limits() -> Any:
    import llguidance

    return llguidance.LLParserLimits(
        max_grammar_size=MAX_GRAMMAR_SIZE, initial_lexer_fuel=INITIAL_LEXER_FUEL
    )


def llguidance_message(error: str) -> str:
    """llguidance's error on one line, capped: a client needs the reason, not the parser
    state the library may append after it."""
    text = " ".join(line.strip() for line in error.splitlines() if line.strip())
    text = text or "unknown error"
    return text if len(text) <= 400 else text[:400] + " ..."


def matcher_failure(matcher: llguidance.LLMatcher) -> ConstraintError:
    """The error of a request whose grammar failed while generating (a limit was hit)."""
    return ConstraintError(
        "the constraint could not continue (it exceeds the grammar engine's limits): "
        + llguidance_message(matcher.get_error())
    )


# Compact JSON (no free whitespace between tokens): a model cannot pad its output with
# whitespace forever, and both backends agree (vLLM: ``disable_any_whitespace``). A schema
# can still opt back in with ``"x-guidance": {"whitespace_flexible": true}``.
JSON_DEFAULTS = {"whitespace_flexible": False}


def grammar_for(constraint: Constraint) -> str:
    """The llguidance grammar text for a constraint (not yet checked)."""
    import llguidance

    spec = constraint.spec
    if constraint.kind == "json_schema":
        if not isinstance(spec, dict):
            raise ConstraintError("json_schema must be a JSON object", param="json_schema")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec),
                defaults=JSON_DEFAULTS,  # type: ignore[arg-type]
            )
        except ValueError as e:
            raise ConstraintError(f"invalid JSON schema: {e}", param="json_schema") from e
    if not isinstance(spec, str):
        raise ConstraintError(f"{constraint.kind} must be a string", param=constraint.kind)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    try:
        # "grammar" accepts llguidance's Lark dialect and converts GBNF.
        return llguidance.grammar_from("grammar", spec)
    except ValueError as e:
        raise ConstraintError(f"invalid grammar: {e}", param="grammar") from e


class ConstraintCompiler:
    """Compiles constraints for one tokenizer and caches the compiled matchers (thread-safe)."""

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, cache_size: int = 128):
        self._tokenizer = ll_tokenizer
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_hf_tokenizer(cls, hf_tokenizer: Any, cache_size: int = 128) -> ConstraintCompiler:
        import llguidance.hf

        return cls(llguidance.hf.from_tokenizer(hf_tokenizer), cache_size)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    def is_special_token(self, token_id: int) -> bool:
        """Whether a grammar must name this token as a token (``<|im_end|>``) to match it.

        llguidance's own verdict, which is not always the tokenizer's ``special`` flag: it
        treats every added token (e.g. ``<123>`` added as an ordinary token) as special,
        and a quoted string would only match that text spelled in byte-level tokens.
        """
        return bool(self._tokenizer.is_special_token(token_id))

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request; ``ConstraintError`` carries the compiler's message."""
        key = constraint_key(constraint)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        metrics.inc(metrics.CONSTRAINT_CACHE, result="miss" if proto is None else "hit")
        if proto is None:
            t0 = time.perf_counter()
            proto = self._compile(constraint)
            metrics.observe(
                metrics.CONSTRAINT_COMPILE, time.perf_counter() - t0, kind=constraint.kind
            )
            with self._lock:
                self.misses += 1
                self._cache[key] = proto
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return proto.deep_copy()

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        import llguidance

        grammar = grammar_for(constraint)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_limits())
        if not matcher.is_error():
            # Some grammars fail only when the first mask is computed (e.g. {"$ref": "#"},
            # a recursion with no end): find out now, once per constraint, rather than
            # inside a batch, where the mask would allow nothing but EOS.
            probe = matcher.deep_copy()
            probe.compute_bitmask()
            if probe.is_error():
                matcher = probe
        if matcher.is_error():
            raise ConstraintError(
                f"invalid {constraint.kind}: {llguidance_message(matcher.get_error())}",
                param=constraint.kind,
            )
        return matcher


def constraint_satisfied(matcher: llguidance.LLMatcher, stopped_by_string: bool) -> bool:
    """The verdict every engine gives on a finished constrained request.

    A stop string that cut the text where the grammar had not ended: not satisfied (we
    cannot vouch for a cut text). Otherwise: whether the grammar accepts the text (always
    true when it completed or EOS was sampled, possibly false when ``max_tokens`` cut it).
    """
    if stopped_by_string and not matcher.is_stopped():
        return False
    return bool(matcher.is_accepting())


@dataclass
class PendingMasks:
    """Bitmasks being computed for some rows of the next logits (see ``BatchMasker.start``)."""

    rows: list[tuple[int, llguidance.LLMatcher]]
    bitmask: torch.Tensor
    done: Future[None]
    started: float


class BatchMasker:
    """Computes the grammar masks of a batch's constrained rows and applies them to its
    logits. ``start`` computes them in a helper thread, so that the model's forward pass
    runs meanwhile (llguidance and torch both release the GIL: this is how vLLM and SGLang
    keep masking off the critical path); ``apply`` waits for them and masks."""

    def __init__(self, vocab_size: int):
        # At load, not on first use: llguidance.torch imports torch.compile's machinery,
        # seconds that would otherwise stall the first batch that has a constraint.
        import llguidance
        import llguidance.torch

        self._executor = llguidance.LLExecutor()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llg-mask")
        self._vocab_size = vocab_size
        # Per masked step: seconds the step waited for its masks after the forward pass
        # (0 when masking was fully hidden), for benchmarks.
        self.mask_seconds: list[float] = []

    def median_mask_seconds(self) -> float | None:
        if not self.mask_seconds:
            return None
        ordered = sorted(self.mask_seconds)
        return ordered[len(ordered) // 2]

    def start(self, rows: list[tuple[int, llguidance.LLMatcher]]) -> PendingMasks | None:
        """Start computing the masks of (row, matcher) pairs; None when there are none.
        The matchers must not advance until ``apply`` has taken the result."""
        import llguidance.torch as llt

        if not rows:
            return None
        bitmask = llt.allocate_token_bitmask(len(rows), self._vocab_size)
        pairs = [(m, i) for i, (_, m) in enumerate(rows)]
        done = self._pool.submit(llt.fill_next_token_bitmask_par, self._executor, pairs, bitmask)
        return PendingMasks(rows, bitmask, done, time.perf_counter())

    @staticmethod
    def settle(pending: PendingMasks | None) -> None:
        """Wait for masks nobody will apply (the forward pass failed): the matchers are
        not touched by the helper thread after this."""
        if pending is not None:
            pending.done.exception()

    def apply(
        self,
        logits: torch.Tensor,
        rows: list[tuple[int, llguidance.LLMatcher]] | PendingMasks | None,
    ) -> list[tuple[int, ConstraintError]]:
        """Mask ``logits`` (batch, model_vocab) in place for the given (row, matcher) pairs
        (computed now) or the masks ``start`` computed.

        Returns the rows whose matcher failed while computing its mask (a grammar limit
        hit mid-way), each with its error: those rows must not be sampled.
        """
        import torch

        pending = rows if isinstance(rows, PendingMasks) or rows is None else self.start(rows)
        if pending is None:
            return []
        waited_from = time.perf_counter()
        pending.done.result()
        # Unpack bits to a boolean "allowed" matrix; tokens beyond the tokenizer's vocab
        # (embedding padding) are never allowed.
        n = len(pending.rows)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((pending.bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(n, -1)
        index = torch.tensor([r for r, _ in pending.rows], dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index)
        width = min(sub.shape[1], allowed.shape[1], self._vocab_size)
        keep = torch.zeros_like(sub, dtype=torch.bool)
        keep[:, :width] = allowed[:, :width].to(sub.device)
        sub.masked_fill_(~keep, float("-inf"))
        logits.index_copy_(0, index, sub)
        self.mask_seconds.append(time.perf_counter() - max(waited_from, pending.started))
        if len(self.mask_seconds) > 100_000:
            del self.mask_seconds[:50_000]
        return [(r, matcher_failure(m)) for r, m in pending.rows if m.is_error()]
