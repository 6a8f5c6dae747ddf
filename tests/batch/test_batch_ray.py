"""The Batch API on real Ray Serve: the runner is a deployment of the graph; it survives
the death of its replica and a restart of the whole app, and the official client works."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import httpx
import pytest

from tests.batch.helpers import chat_line, ended, jsonl, results, stable, submit, wait_for
from tests.conftest import CONTRACT_ARGS, CONTRACT_HEADERS, CONTRACT_KEYS, driver_handle
from tests.helpers import b64, scene_png

pytestmark = pytest.mark.ray

APP = "batch"
PREFIX = "/batch"


def batch_args(store_dir: str) -> dict:
    return {
        **{k: v for k, v in CONTRACT_ARGS.items() if k not in ("sam", "grounder")},
        "sam": None,
        "grounder": None,
        "batch": {
            "store_dir": store_dir,
            "poll_s": 0.2,
            "lease_s": 3,
            "retry_base_s": 0.1,
            "max_concurrency_per_batch": 4,
        },
    }


def deploy(args: dict) -> None:
    from ray import serve

    from serve_apps.ray_app import build_app

    serve.run(build_app(args), name=APP, route_prefix=PREFIX)


@pytest.fixture(scope="module")
def batch_store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ray-batches"))


@pytest.fixture(scope="module")
def batch_url(ray_serve_url, batch_store):
    """A second app on the same Serve instance (beside the contract app): the smoke LLMs,
    the detector and the batch runner, at /batch."""
    from ray import serve

    deploy(batch_args(batch_store))
    yield ray_serve_url + PREFIX
    serve.delete(APP)


@pytest.fixture
async def api(batch_url):
    """A client with the contract's API key: auth is on in this app (CONTRACT_ARGS), while
    the runner's own in-process calls bypass the front door (serve_apps.batch.runner)."""
    async with httpx.AsyncClient(base_url=batch_url, timeout=120, headers=CONTRACT_HEADERS) as c:
        yield c


async def runner_stats() -> dict:

    from serve_apps.ray_app import RayHandle

    handle = RayHandle(driver_handle("BatchRunner", APP))
    return await handle.call("stats")


def assert_each_line_once(out: list[dict], lines: list[dict]) -> None:
    counts = Counter(o["custom_id"] for o in out)
    assert counts == Counter(line["custom_id"] for line in lines)


async def test_a_mixed_batch_through_ray_serve(api):
    image = b64(scene_png())
    lines = [
        chat_line("chat", "hello there"),
        {
            "custom_id": "generate",
            "method": "POST",
            "url": "/v1/generate",
            "body": {"prompt": "n:", "constraints": {"regex": "[0-9]{1,3}"}, "max_tokens": 5},
        },
        {
            "custom_id": "detect",
            "method": "POST",
            "url": "/v1/detect",
            "body": {"image": image, "categories": ["person", "car"]},
        },
        {
            "custom_id": "invalid",
            "method": "POST",
            "url": "/v1/detect",
            "body": {"image": image},  # no categories: 400
        },
    ]
    batch = await submit(api, lines)
    seen: list[str] = []
    batch = await wait_for(api, batch["id"], ended, seen=seen)
    assert batch["status"] == "completed", batch
    assert seen[0] in ("validating", "in_progress", "finalizing", "completed")
    assert batch["created_at"] <= batch["in_progress_at"] <= batch["finalizing_at"]
    assert batch["finalizing_at"] <= batch["completed_at"]
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    out = await results(api, batch)
    assert_each_line_once(out, lines)
    for line in lines:
        (answer,) = [o for o in out if o["custom_id"] == line["custom_id"]]
        interactive = await api.post(line["url"], json=line["body"])
        assert answer["response"]["status_code"] == interactive.status_code
        assert stable(answer["response"]["body"]) == stable(interactive.json()), line
    errors = await api.get(f"/v1/files/{batch['error_file_id']}/content")
    assert '"invalid"' in errors.text and '"categories"' in errors.text


async def test_killing_the_runner_replica_mid_batch_loses_and_repeats_nothing(api):
    lines = [chat_line(f"k{i}", f"line {i}", max_tokens=40) for i in range(24)]
    batch = await submit(api, lines)
    await wait_for(api, batch["id"], lambda b: b["request_counts"]["completed"] >= 2)
    before = await runner_stats()
    assert batch["id"] in before["running"]
    os.kill(before["pid"], signal.SIGKILL)
    batch = await wait_for(api, batch["id"], ended, timeout=600)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 24, "completed": 24, "failed": 0}
    assert_each_line_once(await results(api, batch), lines)
    after = await runner_stats()
    assert after["pid"] != before["pid"]  # a new replica finished it


async def test_restarting_the_whole_app_resumes_the_batch(api, batch_store):
    from ray import serve

    lines = [chat_line(f"r{i}", f"resume {i}", max_tokens=40) for i in range(24)]
    batch = await submit(api, lines)
    await wait_for(api, batch["id"], lambda b: b["request_counts"]["completed"] >= 2)
    await asyncio.to_thread(serve.delete, APP)
    await asyncio.to_thread(deploy, batch_args(batch_store))
    batch = await wait_for(api, batch["id"], ended, timeout=600)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 24, "completed": 24, "failed": 0}
    assert_each_line_once(await results(api, batch), lines)


async def test_a_private_webhook_url_is_refused(api):
    files = {"file": ("in.jsonl", jsonl([chat_line("a", "hi")]), "application/jsonl")}
    file_id = (await api.post("/v1/files", files=files, data={"purpose": "batch"})).json()["id"]
    r = await api.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "webhook_url": "http://127.0.0.1:8265/hook",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhook_url_not_allowed"


async def test_the_batch_routes_need_an_api_key(batch_url):
    async with httpx.AsyncClient(base_url=batch_url, timeout=60) as anonymous:
        r = await anonymous.get("/v1/batches")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_the_official_openai_client(batch_url, tmp_path):
    import time

    import openai

    client = openai.OpenAI(base_url=batch_url + "/v1", api_key=CONTRACT_KEYS["contract"])
    path = tmp_path / "input.jsonl"
    path.write_bytes(jsonl([chat_line("x", "hi"), chat_line("y", "there")]))
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    assert uploaded.id and uploaded.bytes == path.stat().st_size
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"who": "openai-client"},
    )
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.metadata == {"who": "openai-client"}
    assert batch.request_counts.total == 2 and batch.request_counts.completed == 2
    assert batch.output_file_id is not None
    text = client.files.content(batch.output_file_id).text
    assert sorted(line.split('"custom_id": "')[1][0] for line in text.splitlines()) == ["x", "y"]
    assert any(b.id == batch.id for b in client.batches.list())


def test_the_cli_submits_follows_and_fetches(batch_url, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        (folder / f"page{i}.png").write_bytes(scene_png(seed=i))
    cli = [sys.executable, "-m", "serve_apps.cli", "batch"]
    made = subprocess.run(
        [
            *cli,
            "images",
            str(folder),
            "-o",
            str(tmp_path / "in.jsonl"),
            "--endpoint",
            "/v1/detect",
            "--categories",
            "text",
            "--max-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "3 lines" in made.stdout
    server = ["--base-url", batch_url, "--api-key", CONTRACT_KEYS["contract"]]
    submitted = subprocess.run(
        [
            *cli,
            "submit",
            str(tmp_path / "in.jsonl"),
            "--endpoint",
            "/v1/detect",
            "--wait",
            "--interval",
            "0.2",
            *server,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.split()[0]
    assert "completed: 3 completed, 0 failed of 3" in submitted.stdout
    out = tmp_path / "out.jsonl"
    subprocess.run([*cli, "results", batch_id, "-o", str(out), *server], check=True)
    ids = sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    assert ids == ["page0.png", "page1.png", "page2.png"]
