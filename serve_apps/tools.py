"""OpenAI tool calling: the prompt, the grammar the output is generated under, the parse.

When a request gives ``tools`` (and ``tool_choice`` is not ``"none"``), the model's output
is generated under an llguidance grammar on every backend:

- ``"required"`` or a named function: the output is a call, nothing else;
- ``"auto"`` (the default): either a text answer or calls. A text answer may not begin
  with ``<`` (that is how the grammar tells the two apart at the first character).

A call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` whose JSON is
generated under the function's own ``parameters`` schema (``%json`` in the grammar), so
the arguments of a finished call always parse and validate. One call per answer, unless
``parallel_tool_calls: true`` allows several. A call cut short by
``max_tokens`` is not reported as a call: the choice ends with ``"length"`` and its raw
text as content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .engines.constraints import JSON_DEFAULTS
from .schemas.openai import ChatCompletionRequest, NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of one call to any of ``tools``."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # Compact JSON, as every constraint here (constraints.JSON_DEFAULTS).
    return {**schema, "x-guidance": JSON_DEFAULTS}


def tool_grammar(req: ChatCompletionRequest) -> str:
    """The Lark grammar (llguidance dialect) of the request's output."""
    assert req.tools
    tools = req.tools
    if isinstance(req.tool_choice, NamedToolChoice):
        wanted = req.tool_choice.function.name
        tools = [t for t in tools if t.function.name == wanted]
    schema = json.dumps(call_schema(tools), separators=(",", ":"))
    # One call, unless the client asked for parallel calls: a model that may always add
    # another call can run into max_tokens mid-call, and a cut call is no call.
    calls = "call+" if req.parallel_tool_calls else "call"
    lines = [f"call: {json.dumps(OPEN)} %json {schema} {json.dumps(CLOSE)}"]
    if req.tool_choice in (None, "auto"):
        lines.insert(0, f"start: TEXT | {calls}")
        lines.append(r"TEXT: /[^<](?s:.)*/")
    else:
        lines.insert(0, f"start: {calls}")
    return "\n".join(lines) + "\n"


def tool_prompt(tools: list[Tool]) -> str:
    """A system message describing the tools, for chat templates that do not render them."""
    specs = [t.function.model_dump(exclude_none=True) for t in tools]
    return (
        "You can call these functions:\n"
        + "\n".join(json.dumps(s) for s in specs)
        + f'\nTo call one, answer {OPEN}{{"name": <name>, "arguments": <object>}}{CLOSE}.'
    )


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # compact JSON text


def parse_calls(text: str) -> list[ParsedCall] | None:
    """The calls in a finished output, or None when it is a text answer (or a cut call)."""
    if not text.startswith(OPEN):
        return None
    calls: list[ParsedCall] = []
    rest = text
    decoder = json.JSONDecoder()
    while rest.startswith(OPEN):
        try:
            obj, end = decoder.raw_decode(rest, len(OPEN))
        except json.JSONDecodeError:
            return None
        if not rest.startswith(CLOSE, end) or not isinstance(obj, dict):
            return None
        calls.append(
            ParsedCall(str(obj["name"]), json.dumps(obj["arguments"], separators=(",", ":")))
        )
        rest = rest[end + len(CLOSE) :]
    return calls if not rest.strip() else None
