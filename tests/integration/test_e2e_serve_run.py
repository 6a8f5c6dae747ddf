"""End to end: `serve run config.yaml` in a subprocess, driven with the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from serve_apps import dataplane
from tests.conftest import REPO, free_port
from tests.helpers import b64, scene_png

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Runs the README's main job. The config is config.yaml with only the port changed,
    so that the test does not collide with a server someone already runs on :8000."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path_factory.mktemp("e2e") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = path.parent / "serve.log"
    log = log_path.open("w")  # the server outlives this block
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a new cluster, never someone else's
    dataplane.own_ports(env)  # its HAProxy beside the test session's cluster
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen(
        [str(serve_cli), "run", str(path)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text()[-3000:]
                raise AssertionError(f"serve run exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("serve run config.yaml did not become healthy in 300 s")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts its cluster down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served}/v1", api_key="unused")


def test_chat_completion_with_the_openai_client(client):
    resp = client.chat.completions.create(
        model="smoke-llm", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert isinstance(resp.choices[0].message.content, str)
    assert 0 < resp.usage.completion_tokens <= 12


def test_streamed_chat_completion_with_the_openai_client(client):
    stream = client.chat.completions.create(
        model="smoke-llm",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [finishes[-1]] and finishes[-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 12
    assert isinstance(text, str)


def test_json_schema_response_format_with_the_openai_client(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["name", "tags", "score"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model="smoke-codegen",
        messages=[{"role": "user", "content": "Describe a thing as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": True},
        },
        max_tokens=200,
        seed=7,
    )
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_openai_client_sees_errors_as_api_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smoke-llm", messages=[{"role": "user", "content": "x"}], max_tokens=100000
        )
    assert info.value.body["code"] == "context_length_exceeded"


def test_vision_routes_through_serve_run(served):
    """config.yaml's detector, SAM and grounder deployments answer through the ingress."""
    image = b64(scene_png(160, 120, seed=5))
    caption = "a dog next to a red ball"
    r = httpx.post(f"{served}/v1/ground", json={"image": image, "caption": caption}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["phrases"] == ["a dog", "a red ball"]
    for annotation in body["annotations"]:
        assert len(annotation["masks"]) == len(annotation["boxes"])
    r = httpx.post(
        f"{served}/v1/detect",
        json={"image": image, "categories": ["dog"], "visualize": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["visualization"].startswith("data:image/png;base64,")
    models = httpx.get(f"{served}/v1/models", timeout=10).json()["data"]
    assert "smoke-detector" in {m["id"] for m in models}
