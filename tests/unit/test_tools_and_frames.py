"""Tool-call grammars and parsing (serve_apps.tools), and the zip bounds of the compat
frame upload (serve_apps.routers.compat.read_frames): pure logic, no model."""

import io
import json
import zipfile

import pytest

from serve_apps.errors import InvalidRequestError, PayloadTooLargeError
from serve_apps.routers.compat import read_frames
from serve_apps.schemas.openai import ChatCompletionRequest
from serve_apps.tools import parse_calls, tool_grammar

TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "b"}},
]


def chat(**kw):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **kw}
    )


def test_auto_allows_text_or_a_call_and_required_only_a_call():
    auto = tool_grammar(chat())
    assert auto.startswith("start: TEXT | call\n") and "TEXT:" in auto
    required = tool_grammar(chat(tool_choice="required"))
    assert required.startswith("start: call\n") and "TEXT" not in required
    assert tool_grammar(chat(parallel_tool_calls=True)).startswith("start: TEXT | call+")


def test_a_named_choice_allows_only_that_function():
    g = tool_grammar(chat(tool_choice={"type": "function", "function": {"name": "b"}}))
    assert '"const":"b"' in g and '"const":"a"' not in g


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "zz"}}}, "not in tools"),
        ({"response_format": {"type": "json_object"}}, "not both"),
    ],
)
def test_inconsistent_tool_requests_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        chat(**kw)


def test_calls_parse_and_anything_else_is_text():
    one = '<tool_call>{"name":"a","arguments":{"x": 1}}</tool_call>'
    calls = parse_calls(one)
    assert calls is not None and calls[0].name == "a"
    assert json.loads(calls[0].arguments) == {"x": 1}
    assert parse_calls(one + one) is not None and len(parse_calls(one + one) or []) == 2
    assert parse_calls("hello") is None
    assert parse_calls('<tool_call>{"name":"a","argu') is None  # cut by max_tokens


def _zip(files, compression=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


BOUNDS = {"max_frames": 3, "max_frame_bytes": 10_000, "max_ratio": 50}


def test_frames_come_in_name_order_and_other_files_are_skipped():
    data = _zip({"b.png": b"2" * 10, "a.jpg": b"1" * 10, "notes.txt": b"x", "d/": b""})
    assert read_frames(data, **BOUNDS) == [("a.jpg", b"1" * 10), ("b.png", b"2" * 10)]


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({f"{i}.png": b"x" for i in range(4)}, PayloadTooLargeError, "over the limit of 3"),
        ({"big.png": bytes(range(256)) * 50}, PayloadTooLargeError, "refused"),
        ({"bomb.png": b"\0" * 9_000}, PayloadTooLargeError, "x its compressed size"),
        ({"notes.txt": b"x"}, InvalidRequestError, "no image frames"),
    ],
)
def test_zip_bounds_are_decided_before_inflating(files, error, message):
    with pytest.raises(error, match=message):
        read_frames(_zip(files), **BOUNDS)


def test_not_a_zip_is_a_400():
    with pytest.raises(InvalidRequestError, match="not a zip"):
        read_frames(b"plain bytes", **BOUNDS)
