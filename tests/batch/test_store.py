"""The batch store and the input checks, without a model: exactly-once answers, counts,
leases, the state machine, line numbers."""

from __future__ import annotations

import time

from serve_apps.batch.lines import parse_input
from serve_apps.batch.store import BatchStore, LineResult
from tests.batch.helpers import chat_line, jsonl


def make_batch(store: BatchStore, lines: int = 3) -> str:
    data = jsonl([chat_line(f"c{i}", "hi") for i in range(lines)])
    file = store.add_file(data, "in.jsonl", "batch")
    return store.create_batch("/v1/chat/completions", file["id"], "24h", {"k": "v"}, None, 60)["id"]


def test_a_line_answered_twice_is_kept_once_and_counted_once(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = make_batch(store)
    store.start(batch_id, 3, [])
    first = LineResult(0, "c0", 200, "r0", {"answer": 1})
    assert store.record(batch_id, first)
    assert not store.record(batch_id, LineResult(0, "c0", 200, "r0-again", {"answer": 2}))
    assert store.record(batch_id, LineResult(1, "c1", 400, "r1", {"error": {}}))
    assert [r.body for r in store.results(batch_id)] == [{"answer": 1}, {"error": {}}]
    batch = store.get_batch(batch_id)
    assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert store.answered_lines(batch_id) == {0, 1}


def test_the_state_machine_and_its_timestamps(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = make_batch(store)
    batch = store.get_batch(batch_id)
    assert batch["status"] == "validating" and batch["metadata"] == {"k": "v"}
    store.start(batch_id, 3, [])
    assert store.status(batch_id) == "in_progress"
    store.to_finalizing(batch_id)
    store.finish(batch_id, "file-out", None)
    batch = store.get_batch(batch_id)
    assert batch["status"] == "completed" and batch["output_file_id"] == "file-out"
    assert batch["created_at"] <= batch["in_progress_at"] <= batch["finalizing_at"]
    assert batch["finalizing_at"] <= batch["completed_at"]
    # A finished batch is not cancelled.
    assert store.request_cancel(batch_id)["status"] == "completed"


def test_cancel_of_a_running_batch_ends_cancelled(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = make_batch(store)
    store.start(batch_id, 3, [])
    assert store.request_cancel(batch_id)["status"] == "cancelling"
    store.to_finalizing(batch_id)  # not from cancelling
    assert store.status(batch_id) == "cancelling"
    store.finish(batch_id, None, None)
    batch = store.get_batch(batch_id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] and not batch["completed_at"]
    assert store.request_cancel("batch-nope") is None


def test_a_lease_keeps_others_out_until_it_runs_out(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = make_batch(store)
    assert store.claim("a", 0.3, 10) == [batch_id]
    assert store.claim("b", 0.3, 10) == []
    assert store.claim("a", 0.3, 10) == [batch_id]  # renewed by its owner
    time.sleep(0.4)
    assert store.claim("b", 30, 10) == [batch_id]  # a went silent: b takes over
    store.release("b")
    assert store.claim("c", 30, 10) == [batch_id]


def test_files_and_listing_survive_a_new_store_on_the_same_directory(tmp_path):
    store = BatchStore(tmp_path)
    ids = [make_batch(store) for _ in range(3)]
    again = BatchStore(tmp_path)
    page, more = again.list_batches(None, 2)
    assert more and {b["id"] for b in page} <= set(ids)
    rest, more = again.list_batches(page[-1]["id"], 2)
    assert not more and {b["id"] for b in page + rest} == set(ids)
    file_id = again.get_batch(ids[0])["input_file_id"]
    assert again.file_content(file_id).count(b"\n") == 3


def test_input_problems_are_reported_with_their_line_numbers():
    good = chat_line("a", "hi")
    text = (
        jsonl([good]).decode()
        + "not json\n"
        + "\n"  # blank lines are skipped, numbering follows the file
        + jsonl([{**good, "custom_id": "a"}, {**chat_line("b", "x"), "url": "/v1/models"}]).decode()
    ).encode()
    lines, problems, _ = parse_input(text, "/v1/chat/completions", 100)
    assert [(p["line"], p["code"]) for p in problems] == [
        (2, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
    ]
    assert "line 2" in problems[0]["message"]
    assert [line.custom_id for line in lines] == ["a"]


def test_a_body_the_route_would_refuse_is_noted_and_still_runs():
    lines, problems, notes = parse_input(
        jsonl([chat_line("a", "hi"), chat_line("b", "hi", max_tokens=-3)]),
        "/v1/chat/completions",
        100,
    )
    assert problems == [] and [line.custom_id for line in lines] == ["a", "b"]
    assert [(n["line"], n["code"]) for n in notes] == [(2, "invalid_request")]
    assert notes[0]["param"] == "max_tokens"


def test_streaming_lines_and_too_many_lines_fail_validation():
    _, problems, _ = parse_input(
        jsonl([chat_line("a", "hi", stream=True)]), "/v1/chat/completions", 100
    )
    assert problems[0]["line"] == 1 and "stream" in problems[0]["message"]
    _, problems, _ = parse_input(
        jsonl([chat_line(str(i), "hi") for i in range(3)]), "/v1/chat/completions", 2
    )
    assert problems[0]["code"] == "too_many_lines"


def test_a_runner_renews_its_own_leases_before_taking_more(tmp_path):
    store = BatchStore(tmp_path)
    older, newer = make_batch(store), make_batch(store)
    with store._transaction() as db:  # `a` holds the newer one; the older one is free
        db.execute("UPDATE batches SET owner = 'a', lease_until = 1e12 WHERE id = ?", (newer,))
    assert store.claim("a", 30, 1) == [newer]
    assert store.claim("b", 30, 1) == [older]
