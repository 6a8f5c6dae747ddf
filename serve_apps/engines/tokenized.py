"""What every engine that tokenizes its own prompts shares (transformers and vLLM).

Both load a Hugging Face tokenizer, render chat templates with it, compile constraints
with :class:`~.constraints.ConstraintCompiler` and check a request before it reaches the
model. :class:`TokenizedEngine` holds that code once, so a request is refused for the
same reasons with the same messages on every backend.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidRequestError, UnsupportedError
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

    def _check_images(self, request: GenerationRequest) -> None:
        if request.images and not self.supports_images:
            raise UnsupportedError(
                f"{self.model_name_or_path} is a text-only model; send no images"
            )

    async def _check_prompt(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> llguidance.LLMatcher | None:
        """Refuse what cannot run (an empty prompt, prompt + ``max_tokens`` over the
        context, a constraint that does not compile); the request's matcher, if any."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
        check_context(len(prompt_ids), request.sampling.max_tokens, self.info().max_model_len)
        if request.constraint is None:
            return None
        return await asyncio.to_thread(self.compiler.matcher, request.constraint)
