"""The seeds' documented requests (their curl bodies and client calls), replayed against
every contract target through the compat routes, each response checked field by field.

Rex-Omni (``/rex_inference``, ``/api_sam``, ``/api_grounding``), Ananke (``/health``,
``/generate_api``), Cogniverse (``/generate_description``, ``/upload_and_process_frames``)
and OmniDocs (``/extract_from_url``, ``/extract_text``). Seed URLs that point at the
internet are replaced by data URLs of the same field (nothing can be fetched here).
"""

from __future__ import annotations

import io
import json
import zipfile

import jsonschema
import pytest

from tests.helpers import assert_envelope, b64, png_data_url, scene_png

IMAGE_B64 = b64(scene_png(160, 120, seed=21))


@pytest.fixture
def vision(api):
    if api.args.get("detector") is None or api.args.get("sam") is None:
        pytest.skip("this target serves no vision services")
    return api


def check_shapes(predictions, categories):
    assert set(predictions) == set(categories)
    for shapes in predictions.values():
        for shape in shapes:
            assert shape["type"] in ("box", "point", "polygon")
            assert isinstance(shape["coords"], list)


# ------------------------------------------------------------------ Rex-Omni
async def test_rex_inference_as_documented(vision):
    body = {"image": IMAGE_B64, "task": "detection", "categories": ["person", "cup", "laptop"]}
    r = await vision.post("/rex_inference", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True and out["task"] == "detection"
    check_shapes(out["extracted_predictions"], body["categories"])
    assert isinstance(out["inference_time"], float) and out["inference_time"] >= 0
    assert isinstance(out["generation_time"], float) and out["generation_time"] >= 0
    assert isinstance(out["num_output_tokens"], int) and out["num_output_tokens"] >= 1


async def test_api_sam_as_documented(vision):
    body = {"image": IMAGE_B64, "categories": ["person", "laptop"]}
    r = await vision.post("/api_sam", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True
    check_shapes(out["predictions"], body["categories"])
    boxes = sum(len(v) for v in out["predictions"].values())
    assert len(out["sam_results"]) == boxes
    for res in out["sam_results"]:
        assert res["category"] in body["categories"]
        assert len(res["box"]) == 4 and 0.0 <= res["score"] <= 1.5
        assert all(isinstance(p, list) and len(p) % 2 == 0 for p in res["polygons"])


async def test_api_grounding_as_documented(vision):
    api = vision
    if api.args.get("grounder") is None:
        pytest.skip("no grounder on this target")
    body = {"image": IMAGE_B64, "caption": "A person sitting at a desk with a laptop"}
    r = await api.post("/api_grounding", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True and out["caption"] == body["caption"]
    assert "person" in " ".join(out["phrases"]) and "laptop" in " ".join(out["phrases"])
    for a in out["annotations"]:
        assert body["caption"][a["start_char"] : a["end_char"]] == a["phrase"]


async def test_rex_errors_say_success_false_in_the_envelope(vision):
    r = await vision.post("/rex_inference", json={"task": "detection", "categories": ["cup"]})
    err = assert_envelope(r, 400, "invalid_value", success=True)
    assert r.json()["success"] is False and "image" in err["message"]
    r = await vision.post("/api_sam", json={"image": "not base64!", "categories": ["cup"]})
    assert r.status_code == 400 and r.json()["success"] is False


# -------------------------------------------------------------------- Ananke
async def test_ananke_health(api):
    r = await api.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def check_ananke(out, constraint_type):
    assert isinstance(out["generated_text"], str)
    assert isinstance(out["tokens_generated"], int) and out["tokens_generated"] >= 1
    assert isinstance(out["generation_time_ms"], float)
    assert isinstance(out["constraint_satisfied"], bool)
    assert out["metadata"]["constraint_type"] == constraint_type
    assert isinstance(out["metadata"]["tokens_per_sec"], float)


async def test_generate_api_curl_body(api):
    body = {
        "prompt": "Write a Python function:",
        "constraints": {
            "json_schema": {
                "type": "object",
                "properties": {
                    "function_name": {"type": "string"},
                    "parameters": {"type": "array"},
                },
            }
        },
        "max_tokens": 200,
        "temperature": 0.7,
    }
    r = await api.post("/generate_api", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    check_ananke(out, "json_schema")
    if out["finish_reason"] == "stop":
        assert out["constraint_satisfied"] is True
        jsonschema.validate(json.loads(out["generated_text"]), body["constraints"]["json_schema"])


async def test_generate_api_simple_generation_without_constraints(api):
    body = {"prompt": "Write a Python function to add two numbers:", "max_tokens": 100}
    r = await api.post("/generate_api", json={**body, "temperature": 0.7})
    assert r.status_code == 200, r.text
    out = r.json()
    check_ananke(out, "none")
    assert out["constraint_satisfied"] is True


async def test_generate_api_user_profile_schema(api):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "maxLength": 20},
            "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = await api.post(
        "/generate_api",
        json={
            "prompt": "Generate a user profile:",
            "constraints": {"json_schema": schema},
            "max_tokens": 100,
        },
    )
    out = r.json()
    check_ananke(out, "json_schema")
    assert out["finish_reason"] == "stop" and out["constraint_satisfied"] is True
    jsonschema.validate(json.loads(out["generated_text"]), schema)


async def test_generate_api_regex_patterns(api):
    patterns = [r"Result<[a-z]{1,8}>", r"Option<[a-z]{1,8}>"]
    r = await api.post(
        "/generate_api",
        json={"prompt": "Type:", "constraints": {"regex_patterns": patterns}, "max_tokens": 30},
    )
    out = r.json()
    check_ananke(out, "regex_patterns")
    assert out["constraint_satisfied"] is True
    import re

    assert any(re.fullmatch(p, out["generated_text"]) for p in patterns)


async def test_generate_api_the_seeds_grammar_names_its_undefined_rules(api):
    grammar = "function ::= 'fn' name '(' params ')' block"
    r = await api.post("/generate_api", json={"prompt": "p", "constraints": {"grammar": grammar}})
    err = assert_envelope(r, 400, success=True)
    assert r.json()["success"] is False
    assert "name, params, block" in err["message"]


async def test_generate_api_token_mask(api):
    allowed = list(range(300, 340))
    r = await api.post(
        "/generate_api",
        json={
            "prompt": "p",
            "constraints": {"token_mask": {"allowed_tokens": allowed, "forbidden_tokens": [301]}},
            "max_tokens": 8,
            "temperature": 1.0,
        },
    )
    out = r.json()
    check_ananke(out, "token_mask")
    r = await api.post(
        "/generate_api",
        json={"prompt": "p", "constraints": {"token_mask": {"allowed_tokens": [10**8]}}},
    )
    assert assert_envelope(r, 400, success=True)["param"] == "token_mask"


# ---------------------------------------------------------------- Cogniverse
@pytest.mark.parametrize(
    "body",
    [
        {"frame_base64": IMAGE_B64, "prompt": "Describe this video frame in detail"},
        {"frame_base64": IMAGE_B64, "prompt": "Describe this frame"},
        {"image_url": png_data_url(scene_png(64, 48, seed=3)), "prompt": "Describe this frame"},
    ],
)
async def test_generate_description_as_documented(vision, body):
    r = await vision.post("/generate_description", json=body)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"description"} and isinstance(r.json()["description"], str)


def frames_zip(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"frames/frame_{i:03d}.png", scene_png(64, 48, seed=i))
    return buf.getvalue()


async def test_upload_and_process_frames(vision):
    r = await vision.post(
        "/upload_and_process_frames",
        files={"file": ("frames.zip", frames_zip(2), "application/zip")},
        data={"prompt": "Describe this frame"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True and out["num_frames"] == 2
    assert [d["frame"] for d in out["descriptions"]] == [
        "frames/frame_000.png",
        "frames/frame_001.png",
    ]
    assert all(isinstance(d["description"], str) for d in out["descriptions"])
    raw = await vision.post(
        "/upload_and_process_frames",
        content=frames_zip(1),
        headers={"content-type": "application/zip"},
    )
    assert raw.status_code == 200 and raw.json()["num_frames"] == 1


async def test_a_zip_bomb_is_refused(vision):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.png", b"\0" * (20 * 1024 * 1024))
    r = await vision.post(
        "/upload_and_process_frames",
        content=buf.getvalue(),
        headers={"content-type": "application/zip"},
    )
    assert_envelope(r, 413, success=True)
    assert r.json()["success"] is False


# ------------------------------------------------------------------ OmniDocs
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/extract_from_url", {"image_url": png_data_url(scene_png(96, 64, seed=4))}),
        ("/extract_text", {"image": IMAGE_B64}),
    ],
)
async def test_text_extraction(vision, path, body):
    r = await vision.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"success", "content", "content_length", "word_count"}
    assert out["success"] is True
    assert out["content_length"] == len(out["content"])
    assert out["word_count"] == len(out["content"].split())


async def test_extraction_errors_say_success_false(vision):
    r = await vision.post("/extract_from_url", json={"image_url": "ftp://example.com/doc.png"})
    assert r.status_code == 400 and r.json()["success"] is False
    assert "error" in r.json()


async def test_a_multipart_body_without_a_boundary_is_a_400(vision):
    """Found by the schemathesis run (tests/integration/test_fuzz.py): it was a 500."""
    r = await vision.post(
        "/upload_and_process_frames", content=b"", headers={"content-type": "multipart/form-data"}
    )
    assert_envelope(r, 400, success=True)
    assert r.json()["success"] is False
