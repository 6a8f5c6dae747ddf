import pickle

import pytest

from serve_apps import errors


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.InvalidRequestError, 400, None),
        (errors.ConstraintError, 400, "invalid_constraint"),
        (errors.ContextLengthError, 400, "context_length_exceeded"),
        (errors.UnsupportedError, 400, "unsupported"),
        (errors.ModelNotFoundError, 404, "model_not_found"),
        (errors.PayloadTooLargeError, 413, "payload_too_large"),
        (errors.OverloadedError, 503, "overloaded"),
        (errors.EngineError, 500, "engine_error"),
    ],
)
def test_status_and_envelope(cls, status, code):
    exc = cls("boom", param="x")
    assert errors.status_of(exc) == status
    assert errors.error_body(exc) == {
        "error": {"message": "boom", "type": exc.error_type, "param": "x", "code": code}
    }


def test_errors_survive_pickling_with_their_fields():
    exc = errors.ConstraintError("bad regex", param="regex", code="custom")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is errors.ConstraintError
    assert (back.message, back.param, back.code) == ("bad regex", "regex", "custom")


def test_unknown_exceptions_are_500_without_internals():
    body = errors.error_body(KeyError("secret internal detail"))
    assert errors.status_of(KeyError()) == 500
    assert "secret" not in body["error"]["message"]
    assert body["error"]["code"] == "internal_error"


def test_unwrap_finds_our_error_inside_framework_wrappers():
    ours = errors.ModelNotFoundError("nope")

    class RayStyleWrapper(Exception):  # Ray's RayTaskError keeps the original in .cause
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    assert errors.unwrap(RayStyleWrapper(ours)) is ours
    try:
        try:
            raise ours
        except errors.ModelNotFoundError as e:
            raise RuntimeError("outer") from e
    except RuntimeError as outer:
        assert errors.unwrap(outer) is ours
    plain = ValueError("x")
    assert errors.unwrap(plain) is plain
