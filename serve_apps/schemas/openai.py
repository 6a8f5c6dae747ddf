"""OpenAI-compatible chat/completions and models. Requests tolerate unknown fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .. import constraint_limits
from ..errors import UnsupportedError
from .common import Constraints, FinishReason, Seed, StrictModel, TolerantModel, Usage

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 64


class ImageURL(TolerantModel):
    url: str


class ContentPart(TolerantModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(TolerantModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; image parts are rejected by the server that cannot see them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)


class JSONSchemaFormat(TolerantModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _affordable(cls, v: dict[str, Any]) -> dict[str, Any]:
        constraint_limits.check_json_schema(v)  # as /v1/generate's constraints are checked
        return v


class ResponseFormat(TolerantModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.type 'json_schema' needs response_format.json_schema")
        return self


class StreamOptions(TolerantModel):
    include_usage: bool = False


class FunctionDef(TolerantModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _affordable(cls, v: dict[str, Any]) -> dict[str, Any]:
        constraint_limits.check_json_schema(v)  # the arguments are generated under it
        return v


class Tool(TolerantModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(TolerantModel):
    name: str


class NamedToolChoice(TolerantModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice

# Known OpenAI request parameters this server does not implement: a request that sets one
# (to anything but null) is a 400 naming it, never a silent default. Unknown fields are
# still tolerated (clients send new ones).
UNSUPPORTED_PARAMS: tuple[str, ...] = (
    "logit_bias",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "best_of",
    "suffix",
)


class SamplingFields(TolerantModel):
    """Fields shared by chat and completions requests."""

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description=f"choices to generate (at most {MAX_N})")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Extension: a regex / grammar / JSON-schema constraint, as in /v1/generate.
    constraints: Constraints | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def check_supported(self) -> None:
        """``UnsupportedError`` naming the first known OpenAI parameter we do not serve."""
        extra = dict(self.model_extra or {})
        if getattr(self, "echo", False):
            extra["echo"] = True
        for name in ("echo", *UNSUPPORTED_PARAMS):
            value = extra.get(name)
            # null, false and best_of=1 ask for nothing beyond what is served.
            harmless = value is None or value is False or (name == "best_of" and value == 1)
            if not harmless:
                raise UnsupportedError(
                    f"the OpenAI parameter '{name}' is not supported by this server",
                    param=name,
                )

    def logprob_count(self) -> int | None:
        """Alternatives per token to report (0: the sampled token only); None: no logprobs."""
        raise NotImplementedError

    def effective_constraints(self) -> Constraints | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return self.constraints
        if rf.type == "json_object":
            return Constraints(json_schema={"type": "object"})
        assert rf.json_schema is not None
        return Constraints(json_schema=rf.json_schema.schema_)

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingFields:
        if (
            self.constraints is not None
            and self.response_format
            and self.response_format.type != "text"
        ):
            raise ValueError("give either response_format or constraints, not both")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and self.tools:
            names = [t.function.name for t in self.tools]
            if choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, not in tools")
        if self.tools_active() and (
            self.constraints is not None
            or (self.response_format is not None and self.response_format.type != "text")
        ):
            raise ValueError("give either tools or a response_format/constraints, not both")
        return self

    def tools_active(self) -> bool:
        """Whether the model may call a tool (tools given and tool_choice is not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only a single prompt per request is served")
        return v

    # Completions' logprobs is an integer: alternatives per token (0: the sampled one only).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda v: v is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    # Extension, present when the request carried a constraint.
    constraint_satisfied: bool | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    constraint_satisfied: bool | None = None


class StreamedItem(BaseModel):
    """A model streamed item by item across processes (one per token and request, from an
    LLM replica to the ingress): pickled as its JSON, which pydantic-core writes and reads
    in one call, instead of pickle walking the nested models field by field (measured:
    cloudpickle of these chunks was ~16% of the LLM replica's GIL time at 32 streams)."""

    def __reduce__(self) -> tuple[Any, tuple[type[StreamedItem], str]]:
        return _streamed_from_json, (type(self), self.model_dump_json())


def _streamed_from_json(cls: type[StreamedItem], data: str) -> StreamedItem:
    return cls.model_validate_json(data)


class ChatCompletionChunk(StreamedItem):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    constraint_satisfied: bool | None = None


class CompletionResponse(StreamedItem):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve-apps"
    # Extension fields: what this model is for, and whether it is the embedded smoke model.
    service: str
    smoke: bool = False
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(StrictModel):
    status: Literal["ok"] = "ok"
    models: list[str]
