"""What the batch tests share: input files, waiting for a batch, comparable answers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

# Fields of an answer that differ between two runs of the same request.
VOLATILE = {
    "id",
    "created",
    "timings_ms",
    "generation_time_ms",
    "tokens_per_sec",
    "generation_time",
    "inference_time",
    "request_id",  # an error envelope names its request (a batch line's: <batch id>-<line>)
}


def stable(value: Any) -> Any:
    """``value`` without the fields that name or time one particular answer."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "smoke-llm",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def submit(client: Any, lines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Upload ``lines`` and create a batch over them; the batch object."""
    files = {"file": ("input.jsonl", jsonl(lines), "application/jsonl")}
    r = await client.post("/v1/files", files=files, data={"purpose": "batch"})
    assert r.status_code == 200, r.text
    body = {
        "input_file_id": r.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        **extra,
    }
    r = await client.post("/v1/batches", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(
    client: Any, batch_id: str, until: Any, timeout: float = 300, seen: list[str] | None = None
) -> dict[str, Any]:
    """Poll the batch until ``until(batch)``; every status seen goes into ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/v1/batches/{batch_id}")
        assert r.status_code == 200, r.text
        batch = r.json()
        if seen is not None and (not seen or seen[-1] != batch["status"]):
            seen.append(batch["status"])
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        await asyncio.sleep(0.1)


def ended(batch: dict[str, Any]) -> bool:
    return batch["status"] in ("completed", "failed", "cancelled", "expired")


async def results(client: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The output and error file lines of an ended batch, together."""
    lines: list[dict[str, Any]] = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            r = await client.get(f"/v1/files/{batch[key]}/content")
            assert r.status_code == 200, r.text
            lines += parse_jsonl(r.text)
    return lines
