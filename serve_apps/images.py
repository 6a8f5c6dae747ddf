"""Images from requests: base64 / data URLs / http(s) URLs -> bytes -> pixels, with limits.

Every image a client sends goes through here, in the ingress (which enforces the limits
before any model sees the image) and again in the services that need pixels (they get
the validated bytes, which are far smaller than pixels when they cross the network):

- :func:`image_bytes_from_field` decodes base64 or a ``data:`` URL (byte limit: 413);
- :func:`fetch_image_url` downloads an ``http``/``https`` URL under the URL policy:
  private, loopback, link-local and other non-public addresses are refused unless the
  config allows them (IPv6 forms that embed an IPv4 address are judged by it, or
  refused; every redirect hop is checked again, and the connection goes to an address
  that was checked, so DNS cannot swap it afterwards), uncompressed only, with a byte
  limit (per image, and per request with a :class:`ByteBudget`) and a time limit;
- :func:`decode_image` turns bytes into an RGB ``PIL.Image`` (EXIF rotation applied),
  checking the pixel count from the header before decoding (400 when over the limit)
  and reporting a corrupt or unknown file as a 400.

Pillow and httpx are imported lazily: ``import serve_apps.images`` stays light.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urljoin, urlsplit

from . import metrics
from .errors import ImageError, PayloadTooLargeError, ServeAppError

if TYPE_CHECKING:
    from PIL import Image

    from .config import ImageLimits

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I
)


def image_key(data: bytes) -> str:
    """Content hash of an image file: the key of caches of per-image work."""
    return hashlib.sha256(data).hexdigest()


def _too_large(size: int, limit: int, param: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the image is {size} bytes, over the {limit}-byte limit",
        param=param,
        code="image_too_large",
    )


def image_bytes_from_field(value: str, max_bytes: int, param: str = "image") -> bytes:
    """Bytes of an image given inline: plain base64 or a ``data:`` URL with base64 data."""
    text = value.strip()
    match = _DATA_URL.match(text)
    if match is not None:
        if not match.group("b64"):
            raise ImageError("a data URL image must be base64-encoded (;base64,)", param=param)
        text = text[match.end() :]
    elif text.startswith(("http://", "https://")):
        raise ImageError(f"{param} takes base64 or a data URL; send URLs in image_url", param=param)
    # Base64 is 4 characters per 3 bytes: refuse before decoding what cannot fit.
    estimate = len(text) * 3 // 4
    if estimate > max_bytes + 3:
        raise _too_large(estimate, max_bytes, param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{param} is not valid base64: {e}", param=param) from e
    if not data:
        raise ImageError(f"{param} is empty", param=param)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, param)
    return data


def decode_image(data: bytes, max_pixels: int | None = None, param: str = "image") -> Image.Image:
    """An RGB image from file bytes; ``ImageError`` (400) for anything that is not one.

    The bytes are untrusted: whatever a decoder raises on them is the client's problem (a
    400), never a 500. Two cases keep their own answer: a decompression bomb is 400
    ``image_too_many_pixels``, and running out of memory while decoding is 413
    ``image_too_large`` (the image is too big for this service).
    """
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:
        raise _decode_error(e, param, "is not an image this service can read", detail=False) from e
    width, height = image.size
    # The header is read, the pixels are not: refuse before allocating them.
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height} pixels, over the "
            f"{max_pixels}-pixel limit",
            param=param,
            code="image_too_many_pixels",
        )
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels", param=param)
    try:
        image.load()
        rotated = ImageOps.exif_transpose(image)
        return (rotated if rotated is not None else image).convert("RGB")
    except Exception as e:
        raise _decode_error(e, param, "is a damaged or truncated image") from e


def _decode_error(
    e: Exception, param: str, what: str, *, detail: bool = True
) -> ImageError | PayloadTooLargeError:
    """The client error for an exception a decoder raised on an untrusted file."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        return ImageError(str(e), param=param, code="image_too_many_pixels")
    if isinstance(e, MemoryError):
        return PayloadTooLargeError(
            f"{param} needs more memory to decode than this service has",
            param=param,
            code="image_too_large",
        )
    if not detail:
        return ImageError(f"{param} {what}", param=param)
    return ImageError(f"{param} {what}: {str(e) or type(e).__name__}", param=param)


# --------------------------------------------------------------------- image_url
# IPv6 ranges that carry or reach an IPv4 address (or a network) we cannot check, and the
# deprecated site-local range, which some stacks still route internally: always refused.
_REFUSED_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/96",  # IPv4-compatible (deprecated)
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64: the operator's own translation
        "2001::/32",  # Teredo: tunnels to an embedded IPv4 address
        "2002::/16",  # 6to4: an embedded IPv4 address (2002:a9fe:a9fe:: is 169.254.169.254)
        "fec0::/10",  # site-local (deprecated)
    )
)
# The well-known NAT64 prefix: the last 32 bits are the IPv4 address the gateway reaches.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_is_public(address: str) -> bool:
    """True for a globally routable unicast address (what a public URL may point to).

    An IPv6 address that embeds an IPv4 address is judged by that IPv4 address when the
    embedding is a fixed mapping (IPv4-mapped ``::ffff:0:0/96``, NAT64 ``64:ff9b::/96``);
    the other embedding and tunnelling forms (6to4, Teredo, IPv4-compatible, local NAT64)
    and site-local ``fec0::/10`` are refused outright.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.is_site_local or any(ip in net for net in _REFUSED_V6):
            return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


class ByteBudget:
    """Image bytes a whole request may bring in (several images, fetched concurrently).

    Every image takes its bytes from the budget as they arrive, so a download stops as
    soon as the request's images together are over it (413 ``images_too_large``).
    """

    def __init__(self, limit: int, param: str = "messages"):
        self.limit = limit
        self.used = 0
        self._param = param

    def check(self, size: int) -> None:
        """Refuse ``size`` more bytes (a declared length) without taking them."""
        if self.used + size > self.limit:
            raise self._over()

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise self._over()

    def _over(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request's images are over its {self.limit}-byte total limit",
            param=self._param,
            code="images_too_large",
        )


def _refused(message: str) -> ImageError:
    metrics.inc(metrics.IMAGE_FETCH_FAILURES, reason="image_url_not_allowed")
    return ImageError(message, param="image_url", code="image_url_not_allowed")


def _failed(message: str) -> ImageError:
    metrics.inc(metrics.IMAGE_FETCH_FAILURES, reason="image_url_fetch_failed")
    return ImageError(message, param="image_url", code="image_url_fetch_failed")


async def _getaddrinfo(host: str, port: int) -> list[Any]:
    """The resolver (a seam for tests)."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _resolve(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses of ``host``, in the resolver's order; refuse if any is not allowed."""
    try:
        infos = await _getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as e:
        raise _failed(f"cannot resolve {host!r}: {e}") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise _failed(f"cannot resolve {host!r}")
    if not allow_private:
        # Any non-public answer refuses the host: round-robin DNS must not sneak one in.
        for address in addresses:
            if not address_is_public(address):
                raise _refused(
                    f"image_url host {host!r} resolves to {address}, which is not a public "
                    "address (private, loopback and link-local addresses are refused)"
                )
    return addresses


def _host_header(hostname: str, port: int | None) -> str:
    """The Host header of a URL: IPv6 literals in brackets, the port only when explicit."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port is None else f"{host}:{port}"


async def fetch_image_url(url: str, limits: ImageLimits, budget: ByteBudget | None = None) -> bytes:
    """Download an image from an http(s) URL under the configured policy and limits.

    ``budget``, when given, is the request's total for all its images (see
    :class:`ByteBudget`), on top of the per-image ``max_image_bytes``.
    """
    if not limits.allow_image_urls:
        raise _refused("image_url is disabled on this service; send the image inline")
    try:
        return await asyncio.wait_for(_fetch(url, limits, budget), limits.image_url_timeout_s)
    except TimeoutError as e:
        raise _failed(f"fetching image_url took over {limits.image_url_timeout_s} s") from e


async def checked_url(
    url: str,
    allow_private: bool,
    name: str = "image_url",
    refuse: Callable[[str], ServeAppError] = _refused,
) -> tuple[SplitResult, int, list[str]]:
    """The parts, port and checked addresses of a URL the service may connect to (an
    ``image_url``, a batch's webhook): http(s), a host, no credentials, a valid port, and
    addresses that pass the private-address policy. ``refuse`` makes the error (a 400)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise refuse(f"{name} must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise refuse(f"{name} has no host")
    if parts.username or parts.password:
        raise refuse(f"{name} must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise refuse(f"{name} has an invalid port: {e}") from e
    return parts, port, await _resolve(parts.hostname, port, allow_private)


async def _fetch(url: str, limits: ImageLimits, budget: ByteBudget | None) -> bytes:
    import httpx

    async with httpx.AsyncClient(
        timeout=limits.image_url_timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(limits.max_redirects + 1):
            parts, port, addresses = await checked_url(url, limits.allow_private_urls)
            assert parts.hostname is not None
            # Connect to an address that was checked (the next one when a connection
            # fails); keep Host and TLS name (SNI and certificate) those of the URL.
            headers = {
                "Host": _host_header(parts.hostname, parts.port),
                # No compression: the size limit counts bytes as they arrive, and a
                # compressed body could inflate far past it inside one chunk.
                "Accept-Encoding": "identity",
            }
            extensions: dict[str, Any] = {}
            if parts.scheme == "https":
                extensions["sni_hostname"] = parts.hostname
            response = await _connect(client, parts, port, addresses, headers, extensions)
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _failed("image_url redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise _failed(f"image_url answered HTTP {response.status_code}")
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise _failed(
                        f"image_url answered with Content-Encoding {encoding!r}; only "
                        "uncompressed (identity) responses are accepted"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit():
                    if int(declared) > limits.max_image_bytes:
                        raise _too_large(int(declared), limits.max_image_bytes, "image_url")
                    if budget is not None:
                        budget.check(int(declared))
                chunks: list[bytes] = []
                size = 0
                # Identity encoding: the bytes read are the bytes of the image.
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise _too_large(size, limits.max_image_bytes, "image_url")
                    if budget is not None:
                        budget.take(len(chunk))
                    chunks.append(chunk)
            except httpx.HTTPError as e:
                raise _failed(f"fetching image_url failed: {type(e).__name__}: {e}") from e
            finally:
                await response.aclose()
            data = b"".join(chunks)
            if not data:
                raise _failed("image_url returned no data")
            return data
        raise _failed(f"image_url redirected more than {limits.max_redirects} times")


async def _connect(
    client: Any,
    parts: SplitResult,
    port: int,
    addresses: list[str],
    headers: dict[str, str],
    extensions: dict[str, Any],
) -> Any:
    """The response of the first checked address that takes the connection."""
    import httpx

    failures: list[str] = []
    for address in addresses:
        netloc = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        request = client.build_request("GET", target, headers=headers, extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            failures.append(f"{address}: {type(e).__name__}: {e}")  # try the next one
        except httpx.HTTPError as e:
            raise _failed(f"fetching image_url failed: {type(e).__name__}: {e}") from e
    raise _failed(
        "fetching image_url failed: no address took the connection (" + "; ".join(failures) + ")"
    )


async def resolve_image(
    image: str | None,
    image_url: str | None,
    limits: ImageLimits,
    budget: ByteBudget | None = None,
) -> bytes:
    """The bytes of a request's image, from exactly one of ``image`` / ``image_url``;
    ``budget`` (a request's total for all its images) is charged with them."""
    if (image is None) == (image_url is None):
        raise ImageError("give exactly one of image (base64 or data URL) and image_url")
    if image is not None:
        data = image_bytes_from_field(image, limits.max_image_bytes)
    else:
        assert image_url is not None
        if not image_url.startswith("data:"):
            return await fetch_image_url(image_url, limits, budget)
        data = image_bytes_from_field(image_url, limits.max_image_bytes, param="image_url")
    if budget is not None:
        budget.take(len(data))
    return data
