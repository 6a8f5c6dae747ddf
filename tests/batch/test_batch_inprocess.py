"""The Batch API end to end in one process: the ingress app and the runner over the real
servers (smoke models), the runner answering lines through the same app code as HTTP."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import httpx
import pytest

from serve_apps.batch.webhooks import SIGNATURE_HEADER, check_url, verify
from serve_apps.errors import InvalidRequestError
from tests.batch.helpers import chat_line, ended, results, stable, submit, wait_for
from tests.conftest import CONTRACT_ARGS, CONTRACT_HEADERS

SECRET = "test-secret"


@pytest.fixture(scope="module")
async def api(tmp_path_factory):
    from serve_apps.handles import LocalHandle
    from serve_apps.ingress import create_app
    from serve_apps.registry import AppArgs, create_servers

    raw = {
        "llm": CONTRACT_ARGS["llm"],
        "codegen": CONTRACT_ARGS["codegen"],
        "limits": CONTRACT_ARGS["limits"],
        # The front door is on, as in production: clients send a key; the runner's own
        # in-process calls to the app bypass it (serve_apps.batch.runner).
        "auth": CONTRACT_ARGS["auth"],
        "rate_limits": CONTRACT_ARGS["rate_limits"],
        "detector": None,
        "sam": None,
        "grounder": None,
        "batch": {
            "store_dir": str(tmp_path_factory.mktemp("batches")),
            "poll_s": 0.05,
            "retry_base_s": 0.05,
            "max_concurrency_per_batch": 4,
            # The webhook receiver of these tests listens on 127.0.0.1.
            "webhook_allow_private_urls": True,
        },
    }
    args = AppArgs.model_validate(raw)
    servers = create_servers(args)
    for server in servers.values():  # the runner last: it calls the others
        await server.start()
    app = create_app(args, {k: LocalHandle(v) for k, v in servers.items()})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://app",
        timeout=120,
        headers=CONTRACT_HEADERS,
    ) as client:
        yield client
    for server in reversed(servers.values()):
        await server.shutdown()


def generate_line(custom_id: str) -> dict:
    body = {"prompt": "a number:", "constraints": {"regex": "[0-9]{1,4}"}, "max_tokens": 6}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/generate", "body": body}


async def test_a_mixed_batch_answers_like_http_and_counts_exactly(api):
    lines = [
        chat_line("chat-1", "hello there"),
        {
            "custom_id": "completion",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "smoke-llm", "prompt": "once", "max_tokens": 6, "temperature": 0},
        },
        generate_line("generate"),
        chat_line("bad", "hi", max_tokens=-1),  # the route refuses it: 400
        chat_line("chat-2", "seeded", temperature=0.8, seed=7),
    ]
    batch = await submit(api, lines, metadata={"job": "mixed"})
    assert batch["status"] == "validating" and batch["metadata"] == {"job": "mixed"}
    seen: list[str] = []
    batch = await wait_for(api, batch["id"], ended, seen=seen)
    assert batch["status"] == "completed", batch
    assert seen[-1] == "completed" and set(seen) <= {
        "validating",
        "in_progress",
        "finalizing",
        "completed",
    }
    assert batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert batch["created_at"] <= batch["in_progress_at"] <= batch["completed_at"]
    # The invalid line was noted with its number before the batch started.
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(4, "invalid_request")]

    out = await results(api, batch)
    assert sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines)
    for line in lines:
        (answer,) = [o for o in out if o["custom_id"] == line["custom_id"]]
        interactive = await api.post(line["url"], json=line["body"])
        assert answer["response"]["status_code"] == interactive.status_code
        assert stable(answer["response"]["body"]) == stable(interactive.json()), line
    (bad,) = [o for o in out if o["custom_id"] == "bad"]
    assert bad["error"]["code"] == "invalid_value" and bad["response"]["status_code"] == 400
    # The envelope names the line's request ID, the one the output line carries.
    assert bad["response"]["body"]["error"]["request_id"] == bad["response"]["request_id"]
    r = await api.get(f"/v1/files/{batch['error_file_id']}/content")
    assert [json.loads(x)["custom_id"] for x in r.text.splitlines()] == ["bad"]


async def test_cancel_stops_a_batch_and_keeps_what_was_answered(api):
    lines = [chat_line(f"c{i}", f"count {i}", max_tokens=48) for i in range(40)]
    batch = await submit(api, lines)
    await wait_for(api, batch["id"], lambda b: b["request_counts"]["completed"] >= 1)
    r = await api.post(f"/v1/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    batch = await wait_for(api, batch["id"], ended)
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    counts = batch["request_counts"]
    assert counts["total"] == 40 and 1 <= counts["completed"] + counts["failed"] < 40
    out = await results(api, batch)
    assert len(out) == counts["completed"] + counts["failed"]
    assert len({o["custom_id"] for o in out}) == len(out)


async def test_bad_requests_are_4xx_in_the_envelope(api):
    r = await api.post(
        "/v1/files",
        files={"file": ("x.jsonl", b"{}\n", "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = await api.post(
        "/v1/files",
        files={"file": ("x.jsonl", b'{"a": 1}\nnope\n', "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert r.status_code == 400 and "line 2" in r.json()["error"]["message"]
    r = await api.get("/v1/batches/batch-missing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    body = {
        "input_file_id": "file-missing",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert (await api.post("/v1/batches", json=body)).status_code == 404
    body["endpoint"] = "/v1/detect"  # the detector is off in this app
    assert (await api.post("/v1/batches", json=body)).status_code == 400
    body["endpoint"], body["completion_window"] = "/v1/chat/completions", "1h"
    assert (await api.post("/v1/batches", json=body)).status_code == 400


async def test_a_batch_of_bad_lines_fails_with_line_numbers(api):
    lines = [chat_line("a", "hi"), {"custom_id": "a", "url": "/v1/chat/completions", "body": {}}]
    batch = await submit(api, lines)
    batch = await wait_for(api, batch["id"], ended)
    assert batch["status"] == "failed" and batch["failed_at"]
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(2, "duplicate_custom_id")]
    assert batch["request_counts"]["completed"] == 0


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_the_webhook_is_delivered_once_and_signed(api, monkeypatch):
    monkeypatch.setenv("SERVE_APPS_BATCH_WEBHOOK_SECRET", SECRET)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        batch = await submit(api, [chat_line("only", "hi")], webhook_url=url)
        await wait_for(api, batch["id"], ended)
        for _ in range(100):
            if Receiver.received:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # time for a second (wrong) delivery to show up
        assert len(Receiver.received) == 1
        headers, body = Receiver.received[0]
        assert verify(SECRET, body, headers[SIGNATURE_HEADER])
        assert not verify("other", body, headers[SIGNATURE_HEADER])
        payload = json.loads(body)
        assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch["id"]
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest",
        "ftp://example.com/x",
        "http://user:pw@example.com/",
    ],
)
async def test_webhook_urls_the_policy_refuses(url):
    with pytest.raises(InvalidRequestError) as info:
        await check_url(url, allow_private=False)
    assert info.value.code == "webhook_url_not_allowed"
