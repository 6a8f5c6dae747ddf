"""What every engine that tokenizes its own prompts shares (transformers and vLLM).

Both load a Hugging Face tokenizer, render chat templates with it, compile constraints
with :class:`~.constraints.ConstraintCompiler` and check a request before it reaches the
model. :class:`TokenizedEngine` holds that code once, so a request is refused for the
same reasons with the same messages on every backend.
"""

from __future__ import annotations

import asyncio
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ContextLengthError, InvalidRequestError, UnsupportedError
from .base import Constraint, GenerationRequest, LLMEngine, check_context

if TYPE_CHECKING:
    import llguidance

    from .constraints import ConstraintCompiler


class TokenizedEngine(LLMEngine):
    """An engine with a Hugging Face ``tokenizer`` and a ``compiler`` (set when it loads)."""

    supports_images: ClassVar[bool] = False
    model_name_or_path: str
    tokenizer: Any
    compiler: ConstraintCompiler

    def __init__(self) -> None:
        # Tokenizers are not safe to call from several threads at once (requests are
        # prepared in worker threads while the scheduler detokenizes).
        self._tok_lock = threading.Lock()

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        with self._tok_lock:
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text, add_special_tokens=False))

    async def validate_constraint(self, constraint: Constraint) -> None:
        await asyncio.to_thread(self.compiler.matcher, constraint)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: the longest entry of the
        vocabulary (byte-level BPE: one symbol per byte, and a character is at least a
        byte), so a text of N characters needs at least N / this many tokens."""
        with self._tok_lock:
            return max((len(t) for t in self.tokenizer.get_vocab()), default=1)

    def _check_prompt_length(self, request: GenerationRequest) -> None:
        """Refuse a prompt that cannot fit before tokenizing it: tokenizing megabytes holds
        the tokenizer for seconds and allocates gigabytes that the allocator keeps."""
        chars = len(request.prompt)
        fewest_tokens = -(-chars // self.max_token_chars)
        context = self.info().max_model_len
        if fewest_tokens + request.sampling.max_tokens > context:
            raise ContextLengthError(
                f"the prompt ({chars} characters, at least {fewest_tokens} tokens) + "
                f"max_tokens ({request.sampling.max_tokens}) exceeds the model's context of "
                f"{context} tokens",
                param="messages" if not request.add_special_tokens else "prompt",
            )

    def _check_images(self, request: GenerationRequest) -> None:
        if request.images and not self.supports_images:
            raise UnsupportedError(
                f"{self.model_name_or_path} is a text-only model; send no images"
            )

    def _check_token_mask(self, request: GenerationRequest) -> None:
        """A token mask names ids of this model's vocabulary, and leaves something to sample."""
        sp = request.sampling
        if not sp.has_token_mask:
            return
        vocab = self.compiler.vocab_size
        named = (sp.allowed_token_ids or frozenset()) | sp.forbidden_token_ids
        bad = sorted(t for t in named if not 0 <= t < vocab)
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:10]} are not in the model's vocabulary (0..{vocab - 1})",
                param="token_mask",
            )
        if sp.allowed_token_ids is not None and not (sp.allowed_token_ids - sp.forbidden_token_ids):
            raise InvalidRequestError(
                "the token mask allows no token (every allowed token is also forbidden)",
                param="token_mask",
            )

    def _special_tokens(self) -> frozenset[str]:
        """The added tokens llguidance counts as special (``ModelInfo.special_tokens``: a
        grammar must name them as tokens, e.g. Rex-Omni's ``<123>``)."""
        return frozenset(
            str(t.content)
            for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items()
            if i < self.compiler.vocab_size and self.compiler.is_special_token(i)
        )

    def token_text(self, token_id: int) -> str:
        """One token's text, for logprobs (special tokens kept)."""
        with self._tok_lock:
            return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    async def _check_prompt(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> llguidance.LLMatcher | None:
        """Refuse what cannot run (an empty prompt, prompt + ``max_tokens`` over the
        context, a constraint that does not compile); the request's matcher, if any."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
        check_context(len(prompt_ids), request.sampling.max_tokens, self.info().max_model_len)
        self._check_token_mask(request)
        if request.constraint is None:
            return None
        return await asyncio.to_thread(self.compiler.matcher, request.constraint)
