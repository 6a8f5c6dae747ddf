"""``POST /v1/generate``: constrained generation (the codegen service's own API)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .common import Constraints, FinishReason, Seed, StrictModel


class GenerateRequest(StrictModel):
    prompt: str = Field(min_length=1)
    constraints: Constraints | None = Field(
        default=None, description="none (or {}): free generation"
    )
    model: str | None = Field(default=None, description="defaults to the codegen model")
    max_tokens: int | None = Field(default=None, ge=1, description="default: the model's")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None


class GenerateMetadata(BaseModel):
    model: str
    constraint_type: str
    prompt_tokens: int
    tokens_per_sec: float


class GenerateResponse(BaseModel):
    generated_text: str
    tokens_generated: int
    generation_time_ms: float
    constraint_satisfied: bool
    finish_reason: FinishReason
    metadata: GenerateMetadata

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()
