"""Exceptions that cross the wire, and the one mapping from exception to HTTP error.

Every error the service returns has the same body (the OpenAI shape)::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Code that wants to fail a request raises one of the classes below; the ingress turns
it into a response with :func:`error_body` / :func:`status_of`. Each class states its
status in its docstring and in ``status_code``. The ones a client should retry (503, 504)
carry ``retry_after_s``, sent as the ``Retry-After`` header (:func:`error_headers`). The
exceptions are plain picklable objects so that they survive a hop through a Ray or Modal
handle unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class ServeAppError(Exception):
    """Base class: 500, ``internal_error``. Subclasses override the class attributes."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None
    # Seconds a client should wait before retrying (Retry-After); None: do not retry as is.
    default_retry_after_s: float | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else self.default_retry_after_s
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments are lost by the default Exception pickling.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }


def _rebuild(
    cls: type[ServeAppError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None = None,
) -> ServeAppError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class InvalidRequestError(ServeAppError):
    """400: the request is well-formed JSON but asks for something invalid."""

    status_code = 400
    error_type = "invalid_request_error"


class ConstraintError(InvalidRequestError):
    """400: a JSON schema, regex or grammar did not compile; the message is the compiler's."""

    default_code = "invalid_constraint"


class ContextLengthError(InvalidRequestError):
    """400: prompt tokens + ``max_tokens`` exceed what the model or the config allows."""

    default_code = "context_length_exceeded"


class UnsupportedError(InvalidRequestError):
    """400: a valid feature this model or engine does not provide (e.g. images, text model)."""

    default_code = "unsupported"


class ImageError(InvalidRequestError):
    """400: an image that cannot be used: not base64, not an image, damaged, too many
    pixels (code ``image_too_many_pixels``), or an ``image_url`` the policy refuses
    (``image_url_not_allowed``) or that could not be fetched (``image_url_fetch_failed``).
    Too many *bytes* is a :class:`PayloadTooLargeError` (413) instead."""

    default_code = "invalid_image"


class UnauthorizedError(ServeAppError):
    """401: no API key, or one this service does not know (``WWW-Authenticate: Bearer``)."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class RateLimitedError(ServeAppError):
    """429: the API key is over its requests or tokens per minute; retry after
    ``Retry-After`` seconds (when its window resets). A request that could never fit
    (more tokens than the key's whole limit) has no ``Retry-After``."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class NotFoundError(ServeAppError):
    """404: the request names something (a file, a batch) that does not exist."""

    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """404: the ``model`` field names no model this service serves."""

    default_code = "model_not_found"


class PayloadTooLargeError(ServeAppError):
    """413: the request body or an image in it is over the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RequestTimeoutError(ServeAppError):
    """408: the client did not send its request body in time."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class OverloadedError(ServeAppError):
    """503: a queue on the request's path is full; retry after ``Retry-After`` seconds."""

    status_code = 503
    error_type = "overloaded_error"
    default_code = "overloaded"
    default_retry_after_s = 2.0


class UnavailableError(ServeAppError):
    """503: a service the request needs is not ready (starting, failed, its replica died);
    retry after ``Retry-After`` seconds."""

    status_code = 503
    error_type = "unavailable_error"
    default_code = "service_unavailable"
    default_retry_after_s = 5.0


class DeadlineExceededError(ServeAppError):
    """504: the request's deadline passed before it could start or finish; its work was
    stopped. Retry after ``Retry-After`` seconds, or with a longer deadline."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "deadline_exceeded"
    default_retry_after_s = 2.0


class EngineError(ServeAppError):
    """500: the model failed while serving a request that was valid."""

    status_code = 500
    error_type = "internal_error"
    default_code = "engine_error"


def status_of(exc: BaseException) -> int:
    return exc.status_code if isinstance(exc, ServeAppError) else 500


def error_headers(exc: BaseException) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) for the errors a client should retry;
    ``WWW-Authenticate`` on a 401."""
    if isinstance(exc, UnauthorizedError):
        return {"WWW-Authenticate": 'Bearer realm="serve-apps"'}
    after = getattr(exc, "retry_after_s", None)
    if not isinstance(exc, ServeAppError) or after is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(after)))}


def error_body(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """The envelope for any exception; unknown exceptions become a 500 without internals.
    ``request_id`` (the request's ``x-request-id``) goes in the envelope when given."""
    if isinstance(exc, ServeAppError):
        error = exc.to_dict()
    else:
        error = {
            "message": "internal error",
            "type": "internal_error",
            "param": None,
            "code": "internal_error",
        }
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequestError:
    """The 400 for a body that failed its wire model (pydantic/FastAPI ``errors()``)."""
    if errors and errors[0].get("type") == "json_invalid":
        return InvalidRequestError(
            f"request body is not valid JSON: {errors[0].get('msg', '')}", code="invalid_json"
        )

    def where(e: Mapping[str, Any]) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    message = "; ".join(f"{where(e) or 'body'}: {e.get('msg')}" for e in errors)
    param = where(errors[0]) if errors else None
    return InvalidRequestError(message, param=param or None, code="invalid_value")


def unwrap(exc: BaseException) -> BaseException:
    """Find our own error inside a framework's wrapper (Ray wraps remote exceptions).

    Looks at ``cause`` (Ray's ``RayTaskError``) and the ``__cause__`` chain, so the
    handle seam can hand the ingress the exception the replica raised.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ServeAppError):
            return current
        seen.add(id(current))
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    return exc
