"""Images from requests: base64 / data URLs / http(s) URLs -> bytes -> pixels, with limits.

Every image a client sends goes through here, in the ingress (which enforces the limits
before any model sees the image) and again in the services that need pixels (they get
the validated bytes, which are far smaller than pixels when they cross the network):

- :func:`image_bytes_from_field` decodes base64 or a ``data:`` URL (byte limit: 413);
- :func:`fetch_image_url` downloads an ``http``/``https`` URL under the URL policy:
  private, loopback, link-local and other non-public addresses are refused unless the
  config allows them (every redirect hop is checked again, and the connection goes to
  the address that was checked, so DNS cannot swap it afterwards), with a byte limit and
  a time limit;
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
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from .errors import ImageError, PayloadTooLargeError

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
    """An RGB image from file bytes; ``ImageError`` (400) for anything that is not one."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(str(e), param=param, code="image_too_many_pixels") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{param} is not an image this service can read", param=param) from e
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
    except Image.DecompressionBombError as e:
        raise ImageError(str(e), param=param, code="image_too_many_pixels") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{param} is a damaged or truncated image: {e}", param=param) from e


# --------------------------------------------------------------------- image_url
def address_is_public(address: str) -> bool:
    """True for a globally routable unicast address (what a public URL may point to)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _refused(message: str) -> ImageError:
    return ImageError(message, param="image_url", code="image_url_not_allowed")


def _failed(message: str) -> ImageError:
    return ImageError(message, param="image_url", code="image_url_fetch_failed")


async def _resolve(host: str, port: int, allow_private: bool) -> str:
    """One address for ``host`` that the policy allows; refuse if any address is not."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _failed(f"cannot resolve {host!r}: {e}") from e
    addresses = [str(info[4][0]) for info in infos]
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
    return addresses[0]


async def fetch_image_url(url: str, limits: ImageLimits) -> bytes:
    """Download an image from an http(s) URL under the configured policy and limits."""
    if not limits.allow_image_urls:
        raise _refused("image_url is disabled on this service; send the image inline")
    try:
        return await asyncio.wait_for(_fetch(url, limits), limits.image_url_timeout_s)
    except TimeoutError as e:
        raise _failed(f"fetching image_url took over {limits.image_url_timeout_s} s") from e


async def _fetch(url: str, limits: ImageLimits) -> bytes:
    import httpx

    async with httpx.AsyncClient(
        timeout=limits.image_url_timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(limits.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise _refused(f"image_url must be http or https, not {parts.scheme or 'none'!r}")
            if not parts.hostname:
                raise _refused("image_url has no host")
            if parts.username or parts.password:
                raise _refused("image_url must not carry credentials")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError as e:
                raise _refused(f"image_url has an invalid port: {e}") from e
            address = await _resolve(parts.hostname, port, limits.allow_private_urls)
            # Connect to the address that was checked; keep Host and TLS name (SNI and
            # certificate) those of the URL.
            netloc = f"[{address}]" if ":" in address else address
            target = parts._replace(netloc=f"{netloc}:{port}").geturl()
            host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
            extensions: dict[str, Any] = {}
            if parts.scheme == "https":
                extensions["sni_hostname"] = parts.hostname
            request = client.build_request(
                "GET", target, headers={"Host": host_header}, extensions=extensions
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as e:
                raise _failed(f"fetching image_url failed: {type(e).__name__}: {e}") from e
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _failed("image_url redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise _failed(f"image_url answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                    raise _too_large(int(declared), limits.max_image_bytes, "image_url")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise _too_large(size, limits.max_image_bytes, "image_url")
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


async def resolve_image(image: str | None, image_url: str | None, limits: ImageLimits) -> bytes:
    """The bytes of a request's image, from exactly one of ``image`` / ``image_url``."""
    if (image is None) == (image_url is None):
        raise ImageError("give exactly one of image (base64 or data URL) and image_url")
    if image is not None:
        return image_bytes_from_field(image, limits.max_image_bytes)
    assert image_url is not None
    if image_url.startswith("data:"):
        return image_bytes_from_field(image_url, limits.max_image_bytes, param="image_url")
    return await fetch_image_url(image_url, limits)
