"""Base models and the constraint object shared by the OpenAI extension and /v1/generate."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import constraint_limits

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


class Constraints(StrictModel):
    """Exactly one of a JSON schema, a regular expression or a grammar.

    ``grammar`` is a Lark grammar in llguidance's dialect (GBNF is converted too); the
    generated text is guaranteed to match it when generation finishes on its own.
    """

    json_schema: dict[str, Any] | None = None
    regex: str | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Constraints:
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "constraints needs exactly one of json_schema, regex, grammar "
                f"(got {', '.join(given) or 'none'})"
            )
        # What would cost the compiler too much is refused here, before any model sees it.
        if self.json_schema is not None:
            constraint_limits.check_json_schema(self.json_schema)
        elif self.regex is not None:
            constraint_limits.check_regex(self.regex, "regex")
        elif self.grammar is not None:
            constraint_limits.check_grammar(self.grammar)
        return self

    @property
    def kind(self) -> ConstraintKind:
        if self.json_schema is not None:
            return "json_schema"
        return "regex" if self.regex is not None else "grammar"

    @property
    def spec(self) -> str | dict[str, Any]:
        value = getattr(self, self.kind)
        assert value is not None
        return value


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


FinishReason = Literal["stop", "length", "abort", "error"]
