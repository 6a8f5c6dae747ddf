"""Completion webhooks: under the same address policy as ``image_url``, signed, retried.

When a batch ends, its ``webhook_url`` (an extension of ``POST /v1/batches``) gets a
``POST`` with the batch object as JSON. The body is signed with HMAC-SHA256 under the
secret in ``SERVE_APPS_BATCH_WEBHOOK_SECRET``: the header ``X-Serve-Apps-Signature`` is
``sha256=<hex digest of the body>`` (no header without a secret), so a receiver that knows
the secret can check the body came from here, unchanged (:func:`verify`).

The URL is checked when the batch is created and again when it is called: http(s) only,
no credentials, and every address its host resolves to must be public unless the config
allows private ones (the check of :mod:`serve_apps.images`); the request goes to an
address that was checked, redirects are not followed. Failed deliveries (connection
errors, 5xx, 429) are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import urlsplit

from ..errors import ImageError, InvalidRequestError
from ..images import _host_header, checked_url

SIGNATURE_HEADER = "X-Serve-Apps-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver runs: whether ``header`` is this body's signature under ``secret``."""
    return hmac.compare_digest(sign(secret, body), header)


def _refused(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="webhook_url", code="webhook_url_not_allowed")


async def check_url(url: str, allow_private: bool) -> tuple[str, int, list[str]]:
    """The host, port and checked addresses of a webhook URL; a 400 when refused (the
    ``image_url`` policy: :func:`serve_apps.images.checked_url`)."""
    try:
        parts, port, addresses = await checked_url(url, allow_private, "webhook_url", _refused)
    except ImageError as e:  # refused by the address policy, worded for image_url
        raise _refused(e.message.replace("image_url", "webhook_url")) from e
    assert parts.hostname is not None
    return parts.hostname, port, addresses


async def deliver(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str | None,
    allow_private: bool,
    attempts: int,
    backoff_s: float,
    timeout_s: float = 10.0,
) -> int:
    """POST ``payload`` to ``url``; the receiver's status. Raises when refused, or when
    every attempt failed."""
    import httpx
    from tenacity import (
        AsyncRetrying,
        retry_if_exception_type,
        stop_after_attempt,
        wait_random_exponential,
    )

    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)

    class Retryable(Exception):
        pass

    async def attempt() -> int:
        hostname, port, addresses = await check_url(url, allow_private)
        parts = urlsplit(url)
        headers["Host"] = _host_header(hostname, parts.port)
        extensions = {"sni_hostname": hostname} if parts.scheme == "https" else {}
        netloc = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        async with httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            try:
                response = await client.post(
                    target, content=body, headers=headers, extensions=extensions
                )
            except httpx.HTTPError as e:
                raise Retryable(f"{type(e).__name__}: {e}") from e
        if response.status_code >= 500 or response.status_code == 429:
            raise Retryable(f"the receiver answered HTTP {response.status_code}")
        return response.status_code

    status = 0
    async for trial in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=backoff_s, max=backoff_s * 30),
        retry=retry_if_exception_type(Retryable),
        reraise=True,
    ):
        with trial:
            status = await attempt()
    return status
