"""Base models and the constraint object shared by the OpenAI extension and /v1/generate."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import constraint_limits, grammars

logger = logging.getLogger(__name__)


class StrictModel(BaseModel):
    """Our own requests and configs: an unknown key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class TolerantModel(BaseModel):
    """OpenAI-compatible requests: unknown fields are accepted (clients send many) and logged."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> TolerantModel:
        if self.model_extra:
            logger.info(
                "%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra)
            )
        return self


ConstraintKind = Literal["json_schema", "regex", "grammar"]

# A sampling seed: a signed 64-bit integer, what torch.Generator and vLLM accept.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

MAX_REGEX_PATTERNS = 64
MAX_MASK_TOKENS = 1 << 18
TokenId = Annotated[int, Field(ge=0)]


class TokenMask(StrictModel):
    """Token ids the model may sample (None: any) and ids it may never sample. Checked
    against the model's vocabulary by the engine; EOS stays allowed so generation ends."""

    allowed_tokens: list[TokenId] | None = Field(
        default=None, min_length=1, max_length=MAX_MASK_TOKENS
    )
    forbidden_tokens: list[TokenId] = Field(default_factory=list, max_length=MAX_MASK_TOKENS)


class Constraints(StrictModel):
    """At most one of a JSON schema, a regular expression, a list of regular expressions
    or a grammar, and optionally a token mask; none at all is free generation.

    ``grammar`` is Lark (llguidance's dialect), GBNF, or EBNF with single-quoted literals
    (:mod:`serve_apps.grammars`); ``regex_patterns``: the output matches one of them. The
    generated text is guaranteed to match when generation finishes on its own.
    """

    json_schema: dict[str, Any] | None = None
    regex: str | None = Field(default=None, min_length=1)
    regex_patterns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_REGEX_PATTERNS
    )
    grammar: str | None = Field(default=None, min_length=1)
    token_mask: TokenMask | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> Constraints:
        given = [
            k
            for k in ("json_schema", "regex", "regex_patterns", "grammar")
            if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                "constraints takes at most one of json_schema, regex, regex_patterns, grammar "
                f"(got {', '.join(given)})"
            )
        # What would cost the compiler too much is refused here, before any model sees it.
        if self.json_schema is not None:
            constraint_limits.check_json_schema(self.json_schema)
        elif self.regex is not None:
            constraint_limits.check_regex(self.regex, "regex")
        elif self.regex_patterns is not None:
            for i, pattern in enumerate(self.regex_patterns):
                constraint_limits.check_regex(pattern, f"regex_patterns[{i}]")
            constraint_limits.check_regex(self._alternation(), "regex_patterns")
        elif self.grammar is not None:
            constraint_limits.check_grammar(self.grammar)
            grammars.normalize(self.grammar)  # a ::= grammar must read and be complete
        return self

    def _alternation(self) -> str:
        assert self.regex_patterns is not None
        return "|".join(f"(?:{p})" for p in self.regex_patterns)

    @property
    def kind(self) -> ConstraintKind | None:
        """What the output is compiled against; None: no grammar (a token mask at most)."""
        if self.json_schema is not None:
            return "json_schema"
        if self.regex is not None or self.regex_patterns is not None:
            return "regex"
        return "grammar" if self.grammar is not None else None

    @property
    def type_name(self) -> str:
        """The constraint as the client named it (``constraint_type`` in responses)."""
        for k in ("json_schema", "regex", "regex_patterns", "grammar", "token_mask"):
            if getattr(self, k) is not None:
                return k
        return "none"

    @property
    def spec(self) -> str | dict[str, Any]:
        """The compiler's input: a schema, a regex (patterns as one alternation) or a
        grammar in Lark or GBNF."""
        if self.json_schema is not None:
            return self.json_schema
        if self.regex is not None:
            return self.regex
        if self.regex_patterns is not None:
            return self._alternation()
        assert self.grammar is not None
        return grammars.normalize(self.grammar)

    def token_ids(self) -> tuple[frozenset[int] | None, frozenset[int]]:
        """(allowed, forbidden) token ids of the token mask."""
        m = self.token_mask
        if m is None:
            return None, frozenset()
        allowed = frozenset(m.allowed_tokens) if m.allowed_tokens is not None else None
        return allowed, frozenset(m.forbidden_tokens)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    request_id: str | None = Field(
        default=None, description="the request's x-request-id, to quote in a support request"
    )


class ErrorResponse(BaseModel):
    """The one error envelope (serve_apps.errors), as /openapi.json documents it."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]
