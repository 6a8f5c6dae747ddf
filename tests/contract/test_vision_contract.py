"""The vision HTTP contract (/v1/detect, /v1/segment, /v1/ground, chat with images), on
every target: the smoke detector, the smoke SAM checkpoint and the real spaCy pipeline
behind the real servers.

The smoke models have random weights, so the tests check what the service guarantees
(well-formed detections of the asked categories in the image, one mask per box, masks
and polygons inside the image, consistent fields, limits, errors), never where things are.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from serve_apps.engines.detection import parse_prediction, predictions_for_task
from tests.helpers import assert_envelope, b64, png_data_url, scene_png

DETECTOR = "smoke-detector"
W, H = 160, 120


@pytest.fixture(autouse=True)
def _vision_is_on(api):
    if api.args.get("detector") is None or api.args.get("sam") is None:
        pytest.skip("this target serves no vision services")


IMAGE = scene_png(W, H, seed=11)
OTHER = scene_png(W, H, seed=12)


def png_of(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def inside(coords: list[float]) -> bool:
    xs, ys = coords[0::2], coords[1::2]
    return all(0 <= x <= W for x in xs) and all(0 <= y <= H for y in ys)


def clip(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [
        min(max(min(x1, x2), 0), W),
        min(max(min(y1, y2), 0), H),
        min(max(max(x1, x2), 0), W),
        min(max(max(y1, y2), 0), H),
    ]


# ------------------------------------------------------------------ detect
async def test_detect_returns_boxes_of_the_asked_categories(api):
    r = await api.post("/v1/detect", json={"image": b64(IMAGE), "categories": ["person", "car"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == DETECTOR and body["task"] == "detection"
    assert body["image_size"] == [W, H] and body["categories"] == ["person", "car"]
    predictions = body["extracted_predictions"]
    assert list(predictions) == ["person", "car"]
    shapes = [s for found in predictions.values() for s in found]
    assert all(s["type"] == "box" and len(s["coords"]) == 4 and inside(s["coords"]) for s in shapes)
    assert all(len(found) <= 3 for found in predictions.values())  # max_shapes_per_category
    # The structured result is exactly what the raw output says.
    reparsed = predictions_for_task(
        parse_prediction(body["raw_output"], W, H), "detection", ["person", "car"]
    )
    assert reparsed == predictions
    assert body["raw_output"].startswith("<|object_ref_start|>")
    assert body["finish_reason"] in ("stop", "length")
    assert 0 < body["num_output_tokens"] <= 40 and body["num_prompt_tokens"] > 0
    assert body["inference_time"] >= body["generation_time"] > 0
    assert {"decode", "detect", "detect_service", "detect_service_cpu", "total"} <= set(
        body["timings_ms"]
    )
    assert body["visualization"] is None


async def test_detect_is_greedy_and_deterministic(api):
    request = {"image": png_data_url(IMAGE), "categories": "person, car"}
    a, b = [(await api.post("/v1/detect", json=request)).json() for _ in range(2)]
    assert a["raw_output"] == b["raw_output"]


async def test_pointing_returns_points(api):
    r = await api.post(
        "/v1/detect", json={"image": b64(OTHER), "categories": ["cup"], "task": "pointing"}
    )
    body = r.json()
    assert r.status_code == 200 and body["task"] == "pointing"
    assert all(
        s["type"] == "point" and len(s["coords"]) == 2 and inside(s["coords"])
        for s in body["extracted_predictions"]["cup"]
    )


async def test_visualize_adds_a_png_overlay(api):
    r = await api.post(
        "/v1/detect", json={"image": b64(IMAGE), "categories": ["person"], "visualize": True}
    )
    overlay = png_of(r.json()["visualization"])
    assert overlay.format == "PNG" and overlay.size == (W, H)


# ------------------------------------------------------------------ segment
async def test_segment_boxes_gives_one_mask_per_box_inside_the_image(api):
    boxes = [[10, 10, 90, 80], [60, 30, 150, 110], [0, 0, W, H]]
    r = await api.post("/v1/segment", json={"image": b64(IMAGE), "boxes": boxes})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [W, H] and body["predictions"] is None
    assert [res["box"] for res in body["sam_results"]] == boxes
    for res in body["sam_results"]:
        assert res["category"] is None and isinstance(res["score"], float)
        assert 0 <= res["area"] <= W * H
        for polygon in res["polygons"]:
            assert len(polygon) >= 6 and len(polygon) % 2 == 0 and inside(polygon)
    assert {"decode", "segment", "segment_service", "encode", "decode_masks", "total"} <= set(
        body["timings_ms"]
    )
    again = (await api.post("/v1/segment", json={"image": b64(IMAGE), "boxes": boxes[:1]})).json()
    assert again["embedding_cache_hit"] is True  # the encoder ran once for this image
    first, alone = body["sam_results"][0], again["sam_results"][0]
    assert alone["score"] == pytest.approx(first["score"], abs=1e-5)  # batch of 3 vs 1
    assert {**alone, "score": 0} == {**first, "score": 0}


async def test_segment_categories_detects_then_segments_every_box(api):
    r = await api.post(
        "/v1/segment",
        json={"image": b64(OTHER), "categories": ["dog", "ball"], "visualize": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    detected = [
        (category, clip(shape["coords"]))
        for category, shapes in body["predictions"].items()
        for shape in shapes
    ]
    assert [(s["category"], s["box"]) for s in body["sam_results"]] == [
        (c, pytest.approx(b)) for c, b in detected
    ]
    if detected:
        assert {"detect", "encode", "decode_masks"} <= set(body["timings_ms"])
    assert png_of(body["visualization"]).size == (W, H)


# ------------------------------------------------------------------ ground
async def test_ground_goes_from_caption_to_masks(api):
    caption = "a man riding a red bicycle next to two dogs"
    r = await api.post("/v1/ground", json={"image": b64(IMAGE), "caption": caption})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == caption and body["image_size"] == [W, H]
    assert body["phrases"] == ["a man", "a red bicycle", "two dogs"]
    for annotation in body["annotations"]:
        assert (
            caption[annotation["start_char"] : annotation["end_char"]].lower()
            == (annotation["phrase"])
        )
        assert len(annotation["masks"]) == len(annotation["boxes"]) <= 3
        assert all(inside(b) for b in annotation["boxes"])
        assert [m["box"] for m in annotation["masks"]] == [
            pytest.approx(clip(b)) for b in annotation["boxes"]
        ]
    assert {"decode", "phrases", "detect", "total"} <= set(body["timings_ms"])


async def test_ground_a_caption_without_noun_phrases(api):
    r = await api.post("/v1/ground", json={"image": b64(IMAGE), "caption": "It is raining."})
    body = r.json()
    assert r.status_code == 200 and body["phrases"] == [] and body["annotations"] == []
    assert "no noun phrases" in body["message"]


# ------------------------------------------------------------------ chat with images
async def test_the_detector_model_chats_about_images(api):
    r = await api.post(
        "/v1/chat/completions",
        json={
            "model": DETECTOR,
            "max_tokens": 6,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(IMAGE)}},
                        {"type": "text", "text": "What is in the picture?"},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == DETECTOR and 0 < body["usage"]["completion_tokens"] <= 6
    # The image's tokens are in the prompt: far more than the text alone.
    assert body["usage"]["prompt_tokens"] > 30


# ------------------------------------------------------------------ bad input
def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(out, format="PNG")
    return out.getvalue()


def _chat_image(model: str, url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def _detect(**fields) -> dict:
    body = {"image": b64(IMAGE), "categories": ["a"], **fields}
    return {k: v for k, v in body.items() if v is not None}


def _img(**fields) -> dict:
    return {"image": b64(IMAGE), **fields}


NOT_ALLOWED = "image_url_not_allowed"
BAD = [
    ("/v1/detect", _detect(image="@@not base64@@"), 400, "invalid_image"),
    ("/v1/detect", _detect(image=b64(b"just some text")), 400, "invalid_image"),
    ("/v1/detect", _detect(image=b64(IMAGE[:-200])), 400, "invalid_image"),  # truncated
    ("/v1/detect", _detect(image=b64(_png(600, 500))), 400, "image_too_many_pixels"),
    ("/v1/detect", _detect(image=b64(bytes(40000))), 413, "image_too_large"),
    ("/v1/detect", _detect(image=b64(_png(1, 3000))), 400, "invalid_image"),  # too thin
    ("/v1/segment", _img(image=b64(_png(1, 3000)), boxes=[[0, 0, 1, 9]]), 400, "invalid_image"),
    ("/v1/detect", _detect(image_url="https://x.test/a.png"), 400, "invalid_value"),
    ("/v1/detect", _detect(image=None, image_url="http://127.0.0.1:9/a.png"), 400, NOT_ALLOWED),
    ("/v1/detect", _detect(image=None, image_url="http://169.254.169.254/x"), 400, NOT_ALLOWED),
    ("/v1/detect", _detect(image=None, image_url="file:///etc/passwd"), 400, NOT_ALLOWED),
    ("/v1/detect", _detect(categories=["a<b>"]), 400, "invalid_category"),
    ("/v1/detect", _detect(categories=[f"c{i}" for i in range(9)]), 400, "too_many_categories"),
    ("/v1/detect", _detect(task="keypoint"), 400, "invalid_value"),
    ("/v1/detect", _detect(max_tokens=100000), 400, "context_length_exceeded"),
    ("/v1/detect", _detect(colour="red"), 400, "invalid_value"),
    ("/v1/detect", _img(), 400, "invalid_value"),  # no categories
    ("/v1/segment", _img(boxes=[[1, 2, 3]]), 400, "invalid_value"),
    ("/v1/segment", _img(boxes=[[1, 2, 3, 4]], categories=["a"]), 400, "invalid_value"),
    ("/v1/segment", _img(boxes=[[0, 0, 5, 5]] * 9), 400, "too_many_boxes"),
    ("/v1/ground", _img(caption=""), 400, "invalid_value"),
    ("/v1/ground", _img(caption="word " * 500), 400, "caption_too_long"),
    ("/v1/chat/completions", _chat_image("smoke-llm", png_data_url(IMAGE)), 400, "unsupported"),
    ("/v1/chat/completions", _chat_image(DETECTOR, "data:,AAAA"), 400, "invalid_image"),
    ("/v1/chat/completions", _chat_image(DETECTOR, "http://10.0.0.1/a.png"), 400, NOT_ALLOWED),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    BAD,
    ids=[f"{p}-{c}-{i}" for i, (p, _, _, c) in enumerate(BAD)],
)
async def test_bad_vision_input_gets_a_4xx_envelope_and_the_service_keeps_serving(
    api, path, body, status, code
):
    assert_envelope(await api.post(path, json=body), status, code)
    ok = await api.post("/v1/segment", json={"image": b64(IMAGE), "boxes": [[5, 5, 50, 50]]})
    assert ok.status_code == 200
