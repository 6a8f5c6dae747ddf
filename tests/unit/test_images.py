"""Images from requests: inline decoding, limits, damaged files, and the image_url policy
(against a local HTTP server on the loopback interface)."""

import asyncio
import gzip
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from serve_apps import images
from serve_apps.config import ImageLimits
from serve_apps.errors import ImageError, PayloadTooLargeError
from serve_apps.images import (
    address_is_public,
    decode_image,
    fetch_image_url,
    image_bytes_from_field,
    resolve_image,
)
from tests.helpers import b64, png_data_url, scene_png

PNG = scene_png(64, 48)


# ------------------------------------------------------------------ inline images
def test_base64_and_data_urls_give_the_file_bytes():
    assert image_bytes_from_field(b64(PNG), 10**6) == PNG
    assert image_bytes_from_field(png_data_url(PNG), 10**6) == PNG
    wrapped = "\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76))
    assert image_bytes_from_field(wrapped, 10**6) == PNG  # MIME line breaks


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("not base64!!", "not valid base64"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("http://example.com/a.png", "image_url"),
        ("", "empty"),
    ],
)
def test_bad_inline_images_are_400s(value, match):
    with pytest.raises(ImageError, match=match):
        image_bytes_from_field(value, 10**6)


def test_the_byte_limit_is_a_413_before_and_after_decoding():
    with pytest.raises(PayloadTooLargeError) as info:
        image_bytes_from_field(b64(b"x" * 5000), 1000)  # refused from the length alone
    assert info.value.code == "image_too_large"
    with pytest.raises(PayloadTooLargeError):
        image_bytes_from_field(b64(b"x" * 1001), 1000)


def test_decode_gives_rgb_whatever_the_mode():
    for mode in ("L", "RGBA", "P", "1", "I;16"):
        out = io.BytesIO()
        Image.new(mode, (7, 5)).save(out, format="PNG")
        image = decode_image(out.getvalue())
        assert image.mode == "RGB" and image.size == (7, 5)


def test_exif_rotation_is_applied():
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20)).save(out, format="JPEG", exif=exif)
    assert decode_image(out.getvalue()).size == (20, 40)


def test_not_an_image_and_a_truncated_image_are_400s():
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, world")
    big = scene_png(200, 150, seed=3)
    with pytest.raises(ImageError, match="damaged or truncated"):
        decode_image(big[: len(big) // 2])


def test_the_pixel_limit_is_checked_before_the_pixels_are_decoded():
    out = io.BytesIO()
    Image.new("L", (2000, 2000)).save(out, format="PNG")  # 4 megapixels, a few KiB
    with pytest.raises(ImageError) as info:
        decode_image(out.getvalue(), max_pixels=1_000_000)
    assert info.value.code == "image_too_many_pixels"
    assert decode_image(out.getvalue(), max_pixels=4_000_000).size == (2000, 2000)


# ------------------------------------------------------------------ URL policy
@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata endpoints live here
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: judged by the IPv4 address
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::1", False),  # local-use NAT64
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("2002:808:808::1", False),  # 6to4 is refused whatever it embeds
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("::127.0.0.1", False),  # IPv4-compatible
        ("fec0::1", False),  # site-local
    ],
)
def test_only_public_addresses_are_public(address, public):
    assert address_is_public(address) is public


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        self.server.hosts.append(self.headers.get("Host"))
        self.server.encodings.append(self.headers.get("Accept-Encoding"))
        routes = {
            "/img.png": lambda: self._send(PNG),
            "/big": lambda: self._send(b"x" * 5000),
            "/chunked": self._chunked,
            "/slow": self._slow,
            "/gzip": self._gzip,
            "/redirect": lambda: self._redirect("/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/to-other-host": lambda: self._redirect(f"http://127.0.0.2:{port}/img.png"),
        }
        route = routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (size or time limit)

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self):
        self.send_response(200)
        self.end_headers()  # no length: the client must count as it reads
        for _ in range(10):
            self.wfile.write(b"y" * 1000)
        self.close_connection = True

    def _gzip(self):
        body = gzip.compress(PNG)
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow(self):
        time.sleep(2)
        self._send(PNG)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.hosts = []
    httpd.encodings = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


LOCAL = ImageLimits(allow_private_urls=True, max_image_bytes=4096, image_url_timeout_s=1.0)


async def test_private_and_loopback_urls_are_refused_by_default(server):
    strict = ImageLimits()
    port = server.server_address[1]
    for target in (url(server, "/img.png"), f"http://localhost:{port}/img.png"):
        with pytest.raises(ImageError) as info:
            await fetch_image_url(target, strict)
        assert info.value.code == "image_url_not_allowed"
    assert server.hosts == []  # refused before any connection


@pytest.mark.parametrize(
    "target",
    ["file:///etc/passwd", "ftp://example.com/a.png", "http://user:pw@example.com/a.png"],
)
async def test_other_schemes_and_credentials_are_refused(target):
    with pytest.raises(ImageError) as info:
        await fetch_image_url(target, LOCAL)
    assert info.value.code == "image_url_not_allowed"


async def test_image_urls_can_be_switched_off(server):
    with pytest.raises(ImageError, match="disabled"):
        await fetch_image_url(
            url(server, "/img.png"), LOCAL.model_copy(update={"allow_image_urls": False})
        )


async def test_fetch_when_allowed_keeps_the_urls_host_header(server):
    assert await fetch_image_url(url(server, "/img.png"), LOCAL) == PNG
    assert server.hosts[-1] == f"127.0.0.1:{server.server_address[1]}"
    assert await fetch_image_url(url(server, "/redirect"), LOCAL) == PNG


@pytest.mark.parametrize(
    ("path", "error", "code"),
    [
        ("/missing", ImageError, "image_url_fetch_failed"),
        ("/big", PayloadTooLargeError, "image_too_large"),  # declared length
        ("/chunked", PayloadTooLargeError, "image_too_large"),  # counted while reading
        ("/slow", ImageError, "image_url_fetch_failed"),  # over the time limit
        ("/loop", ImageError, "image_url_fetch_failed"),  # too many redirects
        ("/to-file", ImageError, "image_url_not_allowed"),  # each hop is checked
    ],
)
async def test_fetch_failures(server, path, error, code):
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        await fetch_image_url(url(server, path), LOCAL)
    assert info.value.code == code
    assert time.monotonic() - t0 < 1.9  # the slow server is cut off at the time limit


async def test_a_redirect_to_a_private_address_is_refused(server, monkeypatch):
    # Pretend this server's own address is public: its redirect to another loopback
    # address must still be refused, hop by hop.
    monkeypatch.setattr(images, "address_is_public", lambda a: a == "127.0.0.1")
    strict = ImageLimits(image_url_timeout_s=1.0)
    assert await fetch_image_url(url(server, "/img.png"), strict) == PNG
    with pytest.raises(ImageError) as info:
        await fetch_image_url(url(server, "/to-other-host"), strict)
    assert info.value.code == "image_url_not_allowed"


async def test_resolve_image_takes_exactly_one_source(server):
    assert await resolve_image(b64(PNG), None, LOCAL) == PNG
    assert await resolve_image(None, png_data_url(PNG), LOCAL) == PNG
    with pytest.raises(ImageError):
        await resolve_image(b64(PNG), url(server, "/img.png"), LOCAL)
    with pytest.raises(ImageError):
        await resolve_image(None, None, LOCAL)
    await asyncio.sleep(0)


def test_the_host_header_brackets_ipv6_literals():
    assert images._host_header("example.com", None) == "example.com"
    assert images._host_header("example.com", 8080) == "example.com:8080"
    assert images._host_header("2606:4700::1", None) == "[2606:4700::1]"
    assert images._host_header("2606:4700::1", 8443) == "[2606:4700::1]:8443"


async def test_compressed_responses_are_refused_and_identity_is_asked_for(server):
    with pytest.raises(ImageError) as info:
        await fetch_image_url(url(server, "/gzip"), LOCAL)
    assert info.value.code == "image_url_fetch_failed"
    assert "Content-Encoding" in info.value.message
    assert server.encodings[-1] == "identity"


async def test_every_resolved_address_is_tried_in_turn(server, monkeypatch):
    port = server.server_address[1]

    async def two_addresses(host, port_):
        # The first address takes no connection (nothing listens on 127.0.0.2).
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port_)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_)),
        ]

    monkeypatch.setattr(images, "_getaddrinfo", two_addresses)
    assert await fetch_image_url(f"http://images.test:{port}/img.png", LOCAL) == PNG
    assert server.hosts[-1] == f"images.test:{port}"


async def test_a_request_byte_budget_covers_all_its_images(server):
    budget = images.ByteBudget(len(PNG) * 2 - 1)
    assert await resolve_image(b64(PNG), None, LOCAL, budget) == PNG
    with pytest.raises(PayloadTooLargeError) as info:  # declared length over what is left
        await resolve_image(None, url(server, "/img.png"), LOCAL, budget)
    assert info.value.code == "images_too_large"
    with pytest.raises(PayloadTooLargeError):
        await resolve_image(None, png_data_url(PNG), LOCAL, budget)


@pytest.mark.parametrize(
    ("raised", "error", "code"),
    [
        (RuntimeError("a decoder bug"), ImageError, "invalid_image"),
        (MemoryError(), PayloadTooLargeError, "image_too_large"),
    ],
)
def test_whatever_a_decoder_raises_is_the_clients_error(monkeypatch, raised, error, code):
    from PIL import Image as PILImage

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(PILImage, "open", broken)
    with pytest.raises(error) as info:
        decode_image(PNG)
    assert info.value.code == code


async def test_a_chat_requests_images_share_one_deadline(server):
    from serve_apps.pipelines.vision import resolve_chat_images
    from serve_apps.registry import AppArgs
    from serve_apps.schemas.openai import ChatCompletionRequest

    limits = LOCAL.model_dump() | {"image_url_timeout_s": 5.0, "images_timeout_s": 0.3}
    args = AppArgs.model_validate({"images": limits})
    part = {"type": "image_url", "image_url": {"url": url(server, "/slow")}}
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [part, part]}]}
    )
    t0 = time.monotonic()
    with pytest.raises(ImageError) as info:
        await resolve_chat_images(req, args.images)
    assert info.value.code == "image_url_fetch_failed"
    assert time.monotonic() - t0 < 1.9  # the slow server (2 s) is cut off at the deadline
