"""The vision pipelines and routes on fake services, in-process: what runs concurrently,
what is called with what, and how failures and missing services surface."""

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from serve_apps.errors import ContextLengthError
from serve_apps.handles import LocalHandle
from serve_apps.ingress import create_app
from serve_apps.registry import AppArgs, AppContext
from serve_apps.replicas.llm import LLMServer
from serve_apps.schemas.vision import (
    DetectCall,
    DetectResult,
    EncodeResult,
    Mask,
    PhraseResult,
    SegmentResult,
    Shape,
)
from tests.fakes import FakeEngine
from tests.helpers import assert_envelope, b64, scene_png

IMAGE = scene_png(200, 100)


class FakeDetector:
    """Finds a box per category (none for "ghost"); can wait for SAM to start encoding."""

    def __init__(self):
        self.calls: list[DetectCall] = []
        self.wait_for: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def detect(self, call: DetectCall) -> DetectResult:
        self.calls.append(call)
        if self.wait_for is not None:
            await asyncio.wait_for(self.wait_for.wait(), 5)
        if self.fail is not None:
            raise self.fail
        predictions = {
            c: [] if c == "ghost" else [Shape(type="box", coords=[10.0 * i, 5.0, 50.0, 60.0])]
            for i, c in enumerate(call.categories)
        }
        return DetectResult(
            model="fake-detector",
            image_size=(200, 100),
            predictions=predictions,
            raw_output="...",
            finish_reason="stop",
            num_output_tokens=7,
            num_prompt_tokens=40,
            inference_time=0.01,
            generation_time=0.01,
            timings_ms={"decode": 1.0, "generate": 9.0},
        )

    async def health(self):
        return {}


class FakeSAM:
    def __init__(self):
        self.encode_started = asyncio.Event()
        self.block_encode = False
        self.encode_cancelled = False
        self.segment_calls: list[list[list[float]]] = []

    async def encode(self, image: bytes) -> EncodeResult:
        self.encode_started.set()
        try:
            if self.block_encode:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.encode_cancelled = True
            raise
        return EncodeResult(image_size=(200, 100), cache_hit=False, timings_ms={"encode": 42.0})

    async def segment(self, image: bytes, boxes: list[list[float]]) -> SegmentResult:
        self.segment_calls.append(boxes)
        masks = [
            Mask(box=b, score=0.5, area=100 + i, polygons=[[10, 10, 40, 10, 40, 40]])
            for i, b in enumerate(boxes)
        ]
        return SegmentResult(
            image_size=(200, 100),
            masks=masks,
            cache_hit=True,
            timings_ms={"decode": 0.0, "encode": 0.0, "decode_masks": 5.0, "polygons": 1.0},
        )

    async def health(self):
        return {}


class FakeGrounder:
    async def phrases(self, caption: str) -> list[PhraseResult]:
        words = caption.split(" | ")  # the fake's "parse": phrases separated by " | "
        out, at = [], 0
        for w in words:
            out.append(PhraseResult(text=w, start_char=at, end_char=at + len(w), root=w))
            at += len(w) + 3
        return out

    async def health(self):
        return {}


def make_app(**missing_services):
    raw = {
        "llm": {"served_model_name": "fake-llm"},
        "codegen": {"served_model_name": "fake-codegen"},
        "detector": {"served_model_name": "fake-detector", "max_categories": 3},
    }
    raw.update(missing_services)
    args = AppArgs.model_validate(raw)
    services = {
        "llm": LLMServer(args.llm, engine=FakeEngine(reply="hi")),
        "codegen": LLMServer(args.codegen, engine=FakeEngine(reply="hi")),
        "detector": FakeDetector(),
        "sam": FakeSAM(),
        "grounder": FakeGrounder(),
    }
    services = {k: v for k, v in services.items() if k in args.services()}
    return create_app(args, {k: LocalHandle(v) for k, v in services.items()}), services


@pytest.fixture
async def app():
    app, services = make_app()
    for name in ("llm", "codegen"):
        await services[name].start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        yield c, services


async def test_sam_encodes_while_the_detector_runs(app):
    client, services = app
    detector, sam = services["detector"], services["sam"]
    # The detector answers only once SAM has started encoding: a pipeline that waited for
    # the detection before starting the encoder would time out here.
    detector.wait_for = sam.encode_started
    r = await client.post("/v1/segment", json={"image": b64(IMAGE), "categories": ["cat", "dog"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["category"] for s in body["sam_results"]] == ["cat", "dog"]
    assert sam.segment_calls == [[[0.0, 5.0, 50.0, 60.0], [10.0, 5.0, 50.0, 60.0]]]
    assert body["timings_ms"]["encode"] == 42.0
    assert {"decode", "detect", "segment", "decode_masks", "total"} <= set(body["timings_ms"])
    assert body["predictions"]["cat"][0]["type"] == "box"


async def test_explicit_boxes_skip_the_detector(app):
    client, services = app
    r = await client.post(
        "/v1/segment", json={"image": b64(IMAGE), "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    )
    body = r.json()
    assert [s["category"] for s in body["sam_results"]] == [None, None]
    assert [s["box"] for s in body["sam_results"]] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert services["detector"].calls == [] and not services["sam"].encode_started.is_set()
    assert body["embedding_cache_hit"] is True and body["predictions"] is None


async def test_nothing_detected_means_no_segmentation_and_the_encoding_is_dropped(app):
    client, services = app
    services["sam"].block_encode = True
    services["detector"].wait_for = services["sam"].encode_started
    r = await client.post("/v1/segment", json={"image": b64(IMAGE), "categories": "ghost"})
    body = r.json()
    assert r.status_code == 200 and body["sam_results"] == [] and body["message"]
    assert services["sam"].segment_calls == []
    await asyncio.sleep(0.05)
    assert services["sam"].encode_cancelled


async def test_ground_detects_the_usable_phrases_and_maps_masks_back(app):
    client, services = app
    caption = "a cat | ghost | red, blue | a dog"
    r = await client.post("/v1/ground", json={"image": b64(IMAGE), "caption": caption})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["phrases"] == ["a cat", "ghost", "red, blue", "a dog"]
    # "red, blue" cannot be a Rex-Omni category: it is reported, not detected.
    assert services["detector"].calls[0].categories == ["a cat", "ghost", "a dog"]
    annotations = {a["phrase"]: a for a in body["annotations"]}
    assert [len(annotations[p]["boxes"]) for p in body["phrases"]] == [1, 0, 0, 1]
    assert [m["area"] for m in annotations["a dog"]["masks"]] == [101]
    assert annotations["a dog"]["start_char"] == caption.index("a dog")
    assert {"phrases", "detect", "encode", "decode_masks"} <= set(body["timings_ms"])


async def test_a_service_error_keeps_its_status(app):
    client, services = app
    services["detector"].fail = ContextLengthError("too long", param="max_tokens")
    r = await client.post("/v1/detect", json={"image": b64(IMAGE), "categories": ["cat"]})
    assert_envelope(r, 400, "context_length_exceeded")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"categories": ["a<b"]}, 400, "invalid_category"),
        ({"categories": ["a", "b", "c", "d"]}, 400, "too_many_categories"),
        ({"categories": ["a"], "max_tokens": 10**6}, 400, "context_length_exceeded"),
        ({"categories": ["a"], "task": "keypoint"}, 400, "invalid_value"),
        ({"categories": []}, 400, "invalid_value"),
    ],
)
async def test_bad_detect_requests_fail_before_any_service_call(app, body, status, code):
    client, services = app
    assert_envelope(
        await client.post("/v1/detect", json={"image": b64(IMAGE), **body}), status, code
    )
    assert services["detector"].calls == []


async def test_visualize_returns_a_png_of_the_image(app):
    client, _ = app
    r = await client.post(
        "/v1/detect", json={"image": b64(IMAGE), "categories": ["cat"], "visualize": True}
    )
    url = r.json()["visualization"]
    assert url.startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (200, 100)
    assert "visualize" in r.json()["timings_ms"]


async def test_the_client_going_away_cancels_the_head_start_encoding():
    from serve_apps.pipelines.vision import VisionPipelines
    from serve_apps.schemas.vision import SegmentRequest

    _, services = make_app()
    services["sam"].block_encode = True
    services["detector"].wait_for = asyncio.Event()  # never set: detection hangs
    args = AppArgs.model_validate({"detector": {"served_model_name": "fake-detector"}})
    handles = {k: LocalHandle(v) for k, v in services.items()}
    pipelines = VisionPipelines(AppContext.from_handles(args, handles))
    task = asyncio.ensure_future(
        pipelines.segment(SegmentRequest(image=b64(IMAGE), categories=["cat"]))
    )
    await asyncio.wait_for(services["sam"].encode_started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert services["sam"].encode_cancelled


async def test_routes_of_services_not_configured_are_absent():
    app, services = make_app(detector=None, grounder=None)
    for name in ("llm", "codegen"):
        await services[name].start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        image = {"image": b64(IMAGE)}
        assert_envelope(await client.post("/v1/detect", json={**image, "categories": "a"}), 404)
        assert_envelope(await client.post("/v1/ground", json={**image, "caption": "a"}), 404)
        r = await client.post("/v1/segment", json={**image, "categories": "a"})
        assert_envelope(r, 400, "unsupported")
        r = await client.post("/v1/segment", json={**image, "boxes": [[0, 0, 5, 5]]})
        assert r.status_code == 200
        assert (await client.get("/health")).json()["models"] == ["fake-codegen", "fake-llm"]


async def test_a_bad_request_is_refused_before_its_image_url_is_fetched(app):
    client, _ = app
    # The URL is one the policy refuses; the category error must come first.
    body = {"image_url": "http://127.0.0.1:9/a.png", "categories": ["a<b"]}
    assert_envelope(await client.post("/v1/detect", json=body), 400, "invalid_category")
    body = {"image_url": "http://127.0.0.1:9/a.png", "categories": ["a"]}
    assert_envelope(await client.post("/v1/detect", json=body), 400, "image_url_not_allowed")


async def test_segmentation_does_not_wait_for_a_head_start_it_no_longer_needs(app):
    client, services = app
    services["sam"].block_encode = True  # the head-start encode never finishes
    services["detector"].wait_for = services["sam"].encode_started
    body = {"image": b64(IMAGE), "categories": ["cat"]}
    r = await asyncio.wait_for(client.post("/v1/segment", json=body), 10)
    assert r.status_code == 200, r.text
    assert len(r.json()["sam_results"]) == 1
    await asyncio.sleep(0.05)
    assert services["sam"].encode_cancelled


async def test_a_long_caption_is_refused_before_the_image_is_touched(app):
    client, services = app
    body = {"image_url": "http://127.0.0.1:9/a.png", "caption": "x" * 2001}
    assert_envelope(await client.post("/v1/ground", json=body), 400, "caption_too_long")
    assert not services["sam"].encode_started.is_set()


def _chat(*images_per_message):
    from serve_apps.schemas.openai import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {
            "model": "fake-llm",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "what is this?"}]
                    + [{"type": "image_url", "image_url": {"url": u}} for u in urls],
                }
                for urls in images_per_message
            ],
        }
    )


async def test_chat_images_are_counted_per_request_before_any_is_fetched():
    from serve_apps.errors import ImageError
    from serve_apps.pipelines.vision import resolve_chat_images

    args = AppArgs.model_validate({"images": {"max_images_per_request": 2}})
    refused = "http://127.0.0.1:9/a.png"  # fetching it would be a different error
    with pytest.raises(ImageError) as info:
        await resolve_chat_images(_chat([refused], [refused], [refused]), args.images)
    assert info.value.code == "too_many_images"
    assert info.value.param == "messages"


async def test_chat_images_share_one_byte_budget():
    from serve_apps.errors import PayloadTooLargeError
    from serve_apps.pipelines.vision import resolve_chat_images

    url = "data:image/png;base64," + b64(IMAGE)
    budget = len(IMAGE) * 2 + 10
    args = AppArgs.model_validate({"images": {"max_image_bytes_per_request": budget}})
    req = _chat([url], [url])
    await resolve_chat_images(req, args.images)  # two images fit
    with pytest.raises(PayloadTooLargeError) as info:
        await resolve_chat_images(_chat([url], [url], [url]), args.images)
    assert info.value.code == "images_too_large"
