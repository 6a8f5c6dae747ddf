"""The batch store: SQLite plus files, in one directory (durable across restarts).

Layout of ``root`` (default ``<cache_dir>/batches``; on KubeRay the model-cache volume,
on Modal a Volume)::

    batches.sqlite3   files, batches, and one row per answered line
    files/<id>.jsonl  uploaded inputs and the output / error files

Uploaded bytes are written (temporary name, then rename) before their row exists, so a
file row always has its bytes. A line's answer is one ``INSERT OR IGNORE`` keyed by
``(batch_id, line)``: a line answered twice (a runner that died after the call and
before the write is redone by its successor) is kept once, so every line is in the
output exactly once. ``request_counts`` are counted from those rows, never kept apart.

Batch states (OpenAI's)::

    validating -> in_progress -> finalizing -> completed
         \\-> failed (input lines invalid)      \\-> cancelling -> cancelled (cancel)

A runner owns a batch while its lease (``owner``, ``lease_until``) is fresh; a batch whose
owner died is taken over when the lease runs out (:meth:`BatchStore.claim`).

Every method is synchronous and opens its own connection (the callers run them in a
thread); SQLite's WAL mode lets readers (the ingress) run beside the writer (the runner).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "cancelled", "expired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0,
    metadata TEXT, errors TEXT, webhook_url TEXT, webhook_state TEXT,
    owner TEXT, lease_until REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL,
    status_code INTEGER NOT NULL, request_id TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class LineResult:
    """One answered line: what the app answered to it (status and JSON body)."""

    line: int
    custom_id: str
    status_code: int
    request_id: str
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


class BatchStore:
    """Files, batches and line results under ``root``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "batches.sqlite3"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(
        self, data: bytes, filename: str, purpose: str, file_id: str | None = None
    ) -> dict[str, Any]:
        """Store ``data`` as a file (bytes first, then its row); its file object."""
        file_id = file_id or new_id("file")
        path = self.file_path(file_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        row = (file_id, len(data), int(time.time()), filename, purpose)
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", row)
        return self.get_file(file_id) or {}

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "object": "file", "status": "processed"}

    def file_content(self, file_id: str) -> bytes | None:
        if self.get_file(file_id) is None:
            return None
        return self.file_path(file_id).read_bytes()

    # ------------------------------------------------------------------ batches
    def create_batch(
        self,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        webhook_url: str | None,
        window_s: int,
    ) -> dict[str, Any]:
        batch_id = new_id("batch")
        now = int(time.time())
        with self._transaction() as db:
            db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status,"
                " created_at, expires_at, metadata, webhook_url, webhook_state)"
                " VALUES (?, ?, ?, ?, 'validating', ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    endpoint,
                    input_file_id,
                    completion_window,
                    now,
                    now + window_s,
                    json.dumps(metadata) if metadata is not None else None,
                    webhook_url,
                    "pending" if webhook_url else None,
                ),
            )
        return self.get_batch(batch_id) or {}

    def _row(self, batch_id: str) -> sqlite3.Row | None:
        with self._connect() as db:
            row: sqlite3.Row | None = db.execute(
                "SELECT * FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            return row

    def counts(self, batch_id: str) -> dict[str, int]:
        with self._connect() as db:
            row = db.execute(
                "SELECT COUNT(*) AS answered,"
                " COALESCE(SUM(status_code BETWEEN 200 AND 299), 0) AS ok"
                " FROM results WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
        return {"answered": row["answered"], "completed": row["ok"]}

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self._row(batch_id)
        return None if row is None else self._batch_object(row)

    def _batch_object(self, row: sqlite3.Row) -> dict[str, Any]:
        counts = self.counts(row["id"])
        errors = json.loads(row["errors"]) if row["errors"] else None
        status = row["status"]
        return {
            "id": row["id"],
            "object": "batch",
            "endpoint": row["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": status,
            "output_file_id": row["output_file_id"],
            "error_file_id": row["error_file_id"],
            "created_at": row["created_at"],
            "in_progress_at": row["in_progress_at"],
            "expires_at": row["expires_at"],
            "finalizing_at": row["finalizing_at"],
            "completed_at": row["completed_at"],
            "failed_at": row["failed_at"],
            "expired_at": None,
            "cancelling_at": row["cancelling_at"],
            "cancelled_at": row["cancelled_at"],
            "request_counts": {
                "total": row["total"],
                "completed": counts["completed"],
                "failed": counts["answered"] - counts["completed"],
            },
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        }

    def list_batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, ``limit`` of them after the batch ``after``; and whether more exist."""
        with self._connect() as db:
            if after:
                anchor = db.execute(
                    "SELECT created_at, id FROM batches WHERE id = ?", (after,)
                ).fetchone()
                if anchor is None:
                    return [], False
                rows = db.execute(
                    "SELECT * FROM batches WHERE (created_at, id) < (?, ?)"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (anchor["created_at"], anchor["id"], limit + 1),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM batches ORDER BY created_at DESC, id DESC LIMIT ?",
                    (limit + 1,),
                ).fetchall()
        return [self._batch_object(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Cancel: an active batch becomes ``cancelling`` (its runner stops it); a finished
        one is left as it is. None: no such batch."""
        with self._transaction() as db:
            db.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?"
                " WHERE id = ? AND status IN ('validating', 'in_progress')",
                (int(time.time()), batch_id),
            )
        return self.get_batch(batch_id)

    def status(self, batch_id: str) -> str | None:
        row = self._row(batch_id)
        return None if row is None else str(row["status"])

    # ------------------------------------------------------------------ runners
    def claim(self, owner: str, lease_s: float, limit: int) -> list[str]:
        """Batches with work left (active, or ended with a webhook still to deliver) that
        ``owner`` holds or may take (no owner, or a lease that ran out), oldest first;
        their lease is (re)taken for ``lease_s`` seconds. The ones ``owner`` holds come first,
        so its leases are renewed before it takes more."""
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id FROM batches WHERE (status IN (?, ?, ?, ?)"
                " OR webhook_state = 'pending')"
                " AND (owner IS NULL OR owner = ? OR lease_until < ?)"
                " ORDER BY owner IS ? DESC, created_at, id LIMIT ?",
                (*ACTIVE, owner, now, owner, limit),
            ).fetchall()
            ids = [r["id"] for r in rows]
            db.executemany(
                "UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?",
                [(owner, now + lease_s, i) for i in ids],
            )
        return ids

    def release(self, owner: str) -> None:
        """Give up every lease of ``owner`` (a runner shutting down cleanly)."""
        with self._transaction() as db:
            db.execute("UPDATE batches SET owner = NULL, lease_until = 0 WHERE owner = ?", (owner,))

    def batch_row(self, batch_id: str) -> dict[str, Any]:
        row = self._row(batch_id)
        if row is None:
            raise KeyError(batch_id)
        return dict(row)

    def start(self, batch_id: str, total: int, errors: list[dict[str, Any]]) -> None:
        """validating -> in_progress, with the line count and the validation notes."""
        with self._transaction() as db:
            db.execute(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?,"
                " errors = ? WHERE id = ? AND status = 'validating'",
                (int(time.time()), total, json.dumps(errors) if errors else None, batch_id),
            )

    def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        """validating -> failed: the input cannot run; ``errors`` say which lines and why."""
        with self._transaction() as db:
            db.execute(
                "UPDATE batches SET status = 'failed', failed_at = ?, errors = ?"
                " WHERE id = ? AND status = 'validating'",
                (int(time.time()), json.dumps(errors), batch_id),
            )

    def answered_lines(self, batch_id: str) -> set[int]:
        with self._connect() as db:
            rows = db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))
            return {r["line"] for r in rows}

    def record(self, batch_id: str, result: LineResult) -> bool:
        """Keep the answer of one line; False when it was answered before (kept as it was)."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    result.line,
                    result.custom_id,
                    result.status_code,
                    result.request_id,
                    json.dumps(result.body),
                ),
            )
            return cursor.rowcount == 1

    def results(self, batch_id: str) -> list[LineResult]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM results WHERE batch_id = ? ORDER BY line", (batch_id,)
            ).fetchall()
        return [
            LineResult(
                r["line"], r["custom_id"], r["status_code"], r["request_id"], json.loads(r["body"])
            )
            for r in rows
        ]

    def to_finalizing(self, batch_id: str) -> None:
        """in_progress or cancelling -> finalizing (a cancelled batch keeps its status)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE batches SET status = 'finalizing', finalizing_at = ?"
                " WHERE id = ? AND status = 'in_progress'",
                (int(time.time()), batch_id),
            )

    def finish(self, batch_id: str, output_file_id: str | None, error_file_id: str | None) -> None:
        """finalizing -> completed, cancelling -> cancelled, with the result files."""
        now = int(time.time())
        with self._transaction() as db:
            db.execute(
                "UPDATE batches SET output_file_id = ?, error_file_id = ?,"
                " status = CASE status WHEN 'cancelling' THEN 'cancelled' ELSE 'completed' END,"
                " completed_at = CASE status WHEN 'cancelling' THEN NULL ELSE ? END,"
                " cancelled_at = CASE status WHEN 'cancelling' THEN ? ELSE NULL END"
                " WHERE id = ? AND status IN ('finalizing', 'cancelling')",
                (output_file_id, error_file_id, now, now, batch_id),
            )

    def webhook_done(self, batch_id: str, state: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE batches SET webhook_state = ? WHERE id = ?", (state, batch_id))
