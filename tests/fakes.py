"""A deterministic fake LLM engine that keeps the engine contract (serve_apps.engines.base).

It "generates" the words of a fixed reply (or echoes the prompt), one word per token,
honours max_tokens and stop strings, and checks constraints with plain Python tools
(``re``, ``jsonschema``) instead of llguidance: a regex / schema that does not compile is
rejected before the first output, and ``constraint_satisfied`` is the real verdict on the
text it produced.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema

from serve_apps.engines.base import (
    Constraint,
    GenerationOutput,
    GenerationRequest,
    LLMEngine,
    ModelInfo,
)
from serve_apps.errors import ConstraintError, ContextLengthError, UnsupportedError


class FakeEngine(LLMEngine):
    def __init__(self, reply: str | None = None, max_model_len: int = 512, delay_s: float = 0.0):
        self.reply = reply
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.started = False
        self.cancelled: list[str] = []

    async def start(self) -> None:
        self.started = True

    def info(self) -> ModelInfo:
        return ModelInfo("fake", self.max_model_len, eos_token_ids=(0,))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def validate_constraint(self, constraint: Constraint) -> None:
        try:
            if constraint.kind == "regex":
                re.compile(str(constraint.spec))
            elif constraint.kind == "json_schema":
                jsonschema.Draft202012Validator.check_schema(constraint.spec)
            elif "start" not in str(constraint.spec):
                raise ValueError("grammar has no start rule")
        except (re.error, jsonschema.SchemaError, ValueError) as e:
            raise ConstraintError(f"invalid {constraint.kind}: {e}", param=constraint.kind) from e

    @staticmethod
    def satisfies(constraint: Constraint, text: str) -> bool:
        if constraint.kind == "regex":
            return re.fullmatch(str(constraint.spec), text) is not None
        if constraint.kind == "json_schema":
            try:
                assert isinstance(constraint.spec, dict)
                jsonschema.validate(json.loads(text), constraint.spec)
            except (ValueError, jsonschema.ValidationError):
                return False
            return True
        return False  # the fake cannot parse grammars, so it never vouches for one

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if request.images:
            raise UnsupportedError("fake is text-only")
        if request.constraint is not None:
            await self.validate_constraint(request.constraint)
        prompt_tokens = self.count_tokens(request.prompt)
        sp = request.sampling
        if prompt_tokens + sp.max_tokens > self.max_model_len:
            raise ContextLengthError("too long", param="max_tokens")
        words = (self.reply if self.reply is not None else request.prompt).split()
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        finish = "stop"
        if len(pieces) >= sp.max_tokens:
            pieces, finish = pieces[: sp.max_tokens], "length"
        text = "".join(pieces)
        hits = [text.find(s) for s in sp.stop if s in text]
        if hits:  # a stop string ends generation at the token that completed it
            cut = min(hits)
            end = next(i for i in range(len(pieces)) if len("".join(pieces[: i + 1])) >= cut + 1)
            text, finish = text[:cut], "stop"
            pieces = pieces[: end + 1]
        sent = 0
        try:
            for n, piece in enumerate(pieces, start=1):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                upto = min(len(text), sent + len(piece))
                last = n == len(pieces) and finish == "length"
                yield self._out(
                    request, text[sent:upto], n, prompt_tokens, finish if last else None, text
                )
                sent = upto
                if last:
                    return
            yield self._out(
                request, text[sent:], len(pieces), prompt_tokens, "stop", text, new_token=False
            )
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.append(request.request_id)
            raise

    @staticmethod
    def _out(
        request: GenerationRequest,
        delta: str,
        n: int,
        prompt_tokens: int,
        finish: Any,
        full: str,
        new_token: bool = True,
    ) -> GenerationOutput:
        satisfied = None
        if finish is not None and request.constraint is not None:
            satisfied = FakeEngine.satisfies(request.constraint, full)
        return GenerationOutput(
            text=delta,
            token_ids=[n] if new_token else [],
            prompt_tokens=prompt_tokens,
            completion_tokens=n,
            finish_reason=finish,
            constraint_satisfied=satisfied,
        )
