"""Constraints with llguidance: compile once per content hash, mask logits token by token.

A constraint (JSON schema, regex, Lark/GBNF grammar) compiles into an ``LLMatcher`` bound to
the engine's tokenizer. Compiling is the expensive part (milliseconds to a second for big
schemas), so compiled matchers are kept in an LRU keyed by the SHA-256 of the constraint's
canonical text, and each request gets a cheap ``deep_copy`` of the cached one.

During decoding, :class:`BatchMasker` computes the allowed-token bitmask of every
constrained row of the batch in one parallel llguidance call, once the model's forward
pass has been launched, and sets the logits of disallowed tokens to ``-inf`` before
sampling, so the sampled text can only follow the grammar.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
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


def blocked_tokens(bitmask: torch.Tensor, vocab_size: int, device: Any) -> torch.Tensor:
    """llguidance's bitmasks (rows, words) unpacked on ``device``: (rows, vocab_size),
    True where a token is not allowed (bit ``t % 32`` of word ``t // 32`` clear).

    On the CPU with numpy's ``unpackbits`` (int32 words are little-endian, so their bytes
    in order, each read from bit 0 up, give the tokens in order): 88 µs for 8 rows of a
    152k vocab, where the shift-and-mask in torch took 4.6 ms. Elsewhere the packed words
    (32x smaller) are copied to the device and unpacked there."""
    import numpy as np
    import torch

    if torch.device(device).type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab_size] == 0)
    return blocked_tokens_torch(bitmask.to(device, non_blocking=True), vocab_size)


def blocked_tokens_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``blocked_tokens`` with torch ops, on the bitmask's device (a GPU's)."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (rows, words, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size] == 0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class BatchMasker:
    """Computes the grammar masks of a batch's constrained rows and applies them to its
    logits, on the caller's (the scheduler's) thread, once the forward pass has been
    launched: on a GPU, kernel launches return at once and the masks are computed while the
    device still runs the step; the first read of the logits waits for it.

    Not on a helper thread: that was the first design (compute during the forward pass,
    llguidance and torch both release the GIL), and on CPU it measured slower: handing
    even an empty task to a thread and back cost ~200 µs per step (the scheduler and the
    helper trade the GIL between the model's many small ops), while the smoke model's
    masks cost tens of µs. llguidance fills a batch's rows in parallel on its own native
    threads (``LLExecutor``, ~80% of the CPUs) where there are at least 4 CPUs; with
    fewer it has one worker, and filling the rows in a loop measured faster (8 rows: 56
    vs 103 µs on 2 cores)."""

    def __init__(self, vocab_size: int):
        # At load, not on first use: llguidance.torch imports torch.compile's machinery,
        # seconds that would otherwise stall the first batch that has a constraint.
        import llguidance
        import llguidance.torch

        self._executor = llguidance.LLExecutor() if _cpus() >= 4 else None
        self._vocab_size = vocab_size
        # Per masked step: seconds spent computing and applying its masks, for benchmarks.
        self.mask_seconds: list[float] = []

    def median_mask_seconds(self) -> float | None:
        if not self.mask_seconds:
            return None
        ordered = sorted(self.mask_seconds)
        return ordered[len(ordered) // 2]

    def apply(
        self, logits: torch.Tensor, rows: list[tuple[int, llguidance.LLMatcher]]
    ) -> list[tuple[int, ConstraintError]]:
        """Mask ``logits`` (batch, model_vocab) in place for the given (row, matcher) pairs.
        The matchers must be at the position these logits predict.

        Returns the rows whose matcher failed while computing its mask (a grammar limit
        hit mid-way), each with its error: those rows must not be sampled.
        """
        if not rows:
            return []
        started = time.perf_counter()
        import llguidance.torch as llt

        bitmask = llt.allocate_token_bitmask(len(rows), self._vocab_size)
        if self._executor is not None:
            pairs = [(m, k) for k, (_, m) in enumerate(rows)]
            llt.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
        else:
            for k, (_, m) in enumerate(rows):
                llt.fill_next_token_bitmask(m, bitmask, k)
        blocked = blocked_tokens(bitmask, self._vocab_size, logits.device)
        # One fill per row (two when the model's vocab is wider than the tokenizer's:
        # embedding padding, never allowed).
        width = min(logits.shape[1], blocked.shape[1])
        for k, (r, _) in enumerate(rows):
            row = logits[r]
            row[:width].masked_fill_(blocked[k, :width], float("-inf"))
            if row.shape[0] > width:
                row[width:] = float("-inf")
        self.mask_seconds.append(time.perf_counter() - started)
        if len(self.mask_seconds) > 100_000:
            del self.mask_seconds[:50_000]
        return [(r, matcher_failure(m)) for r, m in rows if m.is_error()]
