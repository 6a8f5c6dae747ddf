"""The batch runner: a service of the graph that answers the lines of batches.

``BatchRunner`` is the server of the ``BatchRunner`` deployment (registry entry
``BATCH``). It gets the graph (the app's args and a handle per service, ``Graph``) and
builds the same FastAPI app as the ingress over those handles, so a line is answered by
exactly the code an HTTP request is (validation, routing by ``model``, pipelines, error
envelope), through the same services, in-process: no HTTP hop, no proxy.

Its loop claims batches from the store (:class:`~serve_apps.batch.store.BatchStore`) by
lease, so a runner that died (or a whole app restarted) is taken over where it stopped:
lines already answered are in the store and are not run again. Per batch at most
``max_concurrency_per_batch`` lines run at once, and per service (the key of the service
a line reaches) at most ``max_concurrency_per_service`` across all batches, so that
interactive traffic keeps its share of every replica. Transient failures (502/503/504, a
transport error) are retried with exponential backoff and jitter (tenacity), up to
``max_attempts``; other answers, 4xx included, are final.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from ..clients import Client
from ..config import AuthConfig, RateLimits, Settings
from ..errors import UnavailableError
from ..schemas.common import StrictModel
from .lines import ENDPOINTS, BatchLine, output_line, parse_input
from .store import TERMINAL, BatchStore, LineResult

logger = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({502, 503, 504})
WINDOWS_S = {"24h": 24 * 3600}


class BatchConfig(StrictModel):
    """The ``batch:`` section: where batches are kept and how hard they may push."""

    store_dir: str | None = Field(
        default=None,
        description="directory of the SQLite database and the files (null: "
        "<cache_dir>/batches); every ingress and runner replica must see the same one",
    )
    max_file_bytes: int = Field(default=100 * 2**20, ge=1024, description="largest upload")
    max_lines: int = Field(default=50_000, ge=1, description="most lines in one batch")
    max_concurrency_per_batch: int = Field(default=8, ge=1, le=1024)
    max_concurrency_per_service: int = Field(
        default=8, ge=1, le=1024, description="lines in flight per service, all batches together"
    )
    max_batches: int = Field(default=4, ge=1, le=256, description="batches one runner runs at once")
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="tries of a line (transient errors)"
    )
    retry_base_s: float = Field(default=0.5, gt=0, le=60)
    retry_max_s: float = Field(default=30.0, gt=0, le=600)
    lease_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a silent runner's batches are taken over after this",
    )
    poll_s: float = Field(
        default=1.0, gt=0, le=60, description="how often the runner looks for work"
    )
    webhook_allow_private_urls: bool = Field(
        default=False, description="let webhook_url reach private, loopback, link-local addresses"
    )
    webhook_attempts: int = Field(default=5, ge=1, le=20)

    def store_path(self, settings: Settings | None = None) -> Path:
        if self.store_dir:
            return Path(self.store_dir)
        return (settings or Settings()).cache_dir / "batches"


@dataclass(frozen=True)
class Graph:
    """What a server that calls the rest of the graph gets: the app's args and a handle
    per service (``ServiceSpec.graph``)."""

    args: Any  # AppArgsBase (registry imports this module)
    handles: Mapping[str, Any]


class BatchRunner:
    """What one replica of the ``BatchRunner`` deployment runs."""

    config_type: ClassVar[type[BatchConfig]] = BatchConfig

    def __init__(
        self, config: BatchConfig, graph: Graph | None = None, settings: Settings | None = None
    ):
        self.config = config
        self.graph = graph
        self.settings = settings
        self.owner = f"runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.store: BatchStore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: dict[str, asyncio.Task[None]] = {}
        self._services: dict[str, asyncio.Semaphore] = {}
        self._client: Any = None
        self._model_services: dict[str, str] = {}
        self.lines_answered = 0

    async def start(self) -> None:
        import httpx

        from ..ingress import create_app

        if self.graph is None:
            raise UnavailableError("the batch runner needs the graph's handles")
        self.store = await asyncio.to_thread(BatchStore, self.config.store_path(self.settings))
        # The app of the ingress, over the same handles, without this service, and without
        # the front door: a batch's lines were admitted when the batch was created (through
        # the front door, with the creator's API key), so the runner's in-process calls need
        # no key of their own and do not count against any key's rate limits.
        args = self.graph.args.model_copy(
            update={"batch": None, "auth": AuthConfig(), "rate_limits": RateLimits()}
        )
        handles = {k: h for k, h in self.graph.handles.items() if k != "batch"}
        self._model_services = {
            cfg.served_model_name: key for key, cfg in args.model_configs().items()
        }
        transport = httpx.ASGITransport(app=create_app(args, handles), raise_app_exceptions=False)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None)
        self._loop_task = asyncio.create_task(self._loop())

    async def health(self) -> dict[str, Any]:
        if self._loop_task is None or self._loop_task.done():
            raise UnavailableError("the batch runner's loop is not running")
        return {"running": sorted(self._batches)}

    async def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "owner": self.owner,
            "running": sorted(self._batches),
            "lines_answered": self.lines_answered,
        }

    async def shutdown(self) -> None:
        tasks = [t for t in (self._loop_task, *self._batches.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.release, self.owner)
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        assert self.store is not None
        while True:
            try:
                claimed = await asyncio.to_thread(
                    self.store.claim, self.owner, self.config.lease_s, self.config.max_batches
                )
                for batch_id in claimed:
                    if batch_id not in self._batches:
                        task = asyncio.create_task(self._run(batch_id))
                        self._batches[batch_id] = task
                        task.add_done_callback(self._forget(batch_id))
            except Exception:
                logger.exception("the batch runner could not claim work")
            await asyncio.sleep(self.config.poll_s)

    def _forget(self, batch_id: str) -> Any:
        def forget(_: asyncio.Task[None]) -> None:
            self._batches.pop(batch_id, None)

        return forget

    async def _run(self, batch_id: str) -> None:
        try:
            await self._advance(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left to the next claim (this runner's next loop, or a successor's).
            logger.exception("batch %s stopped on an error; it is retried", batch_id)
            await asyncio.sleep(self.config.poll_s)

    async def _advance(self, batch_id: str) -> None:
        store = self.store
        assert store is not None
        row = await asyncio.to_thread(store.batch_row, batch_id)
        status = row["status"]
        if status == "cancelling" and row["in_progress_at"] is None:
            await asyncio.to_thread(store.finish, batch_id, None, None)  # never started
        elif status in ("validating", "in_progress", "cancelling", "finalizing"):
            data = await asyncio.to_thread(store.file_content, row["input_file_id"])
            lines, problems, notes = parse_input(
                data or b"", row["endpoint"], self.config.max_lines
            )
            if status == "validating":
                if problems:
                    await asyncio.to_thread(store.fail, batch_id, problems)
                else:
                    await asyncio.to_thread(store.start, batch_id, len(lines), notes)
                    status = "in_progress"
            if status in ("in_progress", "cancelling"):
                await self._answer_all(batch_id, row["endpoint"], lines)
                await asyncio.to_thread(store.to_finalizing, batch_id)
            if (await asyncio.to_thread(store.status, batch_id)) in ("finalizing", "cancelling"):
                await self._finalize(batch_id)
        row = await asyncio.to_thread(store.batch_row, batch_id)
        if row["status"] in TERMINAL and row["webhook_state"] == "pending":
            await self._notify(batch_id, row["webhook_url"])

    async def _answer_all(self, batch_id: str, endpoint: str, lines: list[BatchLine]) -> None:
        store = self.store
        assert store is not None
        answered = await asyncio.to_thread(store.answered_lines, batch_id)
        todo = [line for line in lines if line.index not in answered]
        slots = asyncio.Semaphore(self.config.max_concurrency_per_batch)
        running: set[asyncio.Task[None]] = set()

        async def answer(line: BatchLine) -> None:
            try:
                await self._answer(batch_id, line)
            finally:
                slots.release()

        try:
            for line in todo:
                await slots.acquire()
                if await asyncio.to_thread(store.status, batch_id) == "cancelling":
                    slots.release()
                    break
                task = asyncio.create_task(answer(line))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()

    def _service_of(self, endpoint: str, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if isinstance(model, str) and model in self._model_services:
            return self._model_services[model]
        return ENDPOINTS[endpoint][1]

    async def _answer(self, batch_id: str, line: BatchLine) -> None:
        import httpx
        from tenacity import (
            AsyncRetrying,
            retry_if_exception_type,
            retry_if_result,
            stop_after_attempt,
            wait_random_exponential,
        )

        service = self._service_of(line.url, line.body)
        slot = self._services.setdefault(
            service, asyncio.Semaphore(self.config.max_concurrency_per_service)
        )
        request_id = f"{batch_id}-{line.index}"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait_random_exponential(
                multiplier=self.config.retry_base_s, max=self.config.retry_max_s
            ),
            retry=retry_if_result(lambda r: r.status_code in RETRIED_STATUSES)
            | retry_if_exception_type(httpx.TransportError),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )

        async def post() -> httpx.Response:
            async with slot:  # the slot is held while calling, not while backing off
                return await self._client.post(
                    line.url, json=line.body, headers={"x-request-id": request_id}
                )

        try:
            response: httpx.Response = await retrying(post)
            status, body = response.status_code, _body_of(response)
        except httpx.TransportError as e:
            logger.warning("batch %s line %d failed: %s", batch_id, line.number, e)
            status = 500
            body = {
                "error": {
                    "message": "internal error",
                    "type": "internal_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
        result = LineResult(line.index, line.custom_id, status, request_id, body)
        assert self.store is not None
        if await asyncio.to_thread(self.store.record, batch_id, result):
            self.lines_answered += 1

    async def _finalize(self, batch_id: str) -> None:
        store = self.store
        assert store is not None
        results = await asyncio.to_thread(store.results, batch_id)
        ok = [r for r in results if r.ok]
        failed = [r for r in results if not r.ok]
        file_ids: list[str | None] = []
        stem = batch_id.removeprefix("batch-")
        for kind, items in (("output", ok), ("errors", failed)):
            if not items:
                file_ids.append(None)
                continue
            import json

            data = "".join(
                json.dumps(
                    output_line(batch_id, r.line, r.custom_id, r.status_code, r.request_id, r.body)
                )
                + "\n"
                for r in items
            ).encode()
            # A fixed id per batch and kind: finalizing again (after a restart) rewrites it.
            file_id = f"file-{stem}-{kind}"
            await asyncio.to_thread(
                store.add_file, data, f"{batch_id}_{kind}.jsonl", "batch_output", file_id
            )
            file_ids.append(file_id)
        await asyncio.to_thread(store.finish, batch_id, file_ids[0], file_ids[1])

    async def _notify(self, batch_id: str, url: str) -> None:
        from .webhooks import deliver

        store = self.store
        assert store is not None
        batch = await asyncio.to_thread(store.get_batch, batch_id)
        secret = (self.settings or Settings()).batch_webhook_secret
        try:
            status = await deliver(
                url,
                {"type": f"batch.{batch['status']}", "data": batch} if batch else {},
                secret=secret.get_secret_value() if secret else None,
                allow_private=self.config.webhook_allow_private_urls,
                attempts=self.config.webhook_attempts,
                backoff_s=self.config.retry_base_s,
            )
            state = "delivered" if status < 400 else f"refused_{status}"
        except Exception as e:
            logger.warning("batch %s: webhook %s failed: %s", batch_id, url, e)
            state = "failed"
        await asyncio.to_thread(store.webhook_done, batch_id, state)


def _body_of(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return {
            "content_type": response.headers.get("content-type"),
            "base64": base64.b64encode(response.content).decode(),
        }


class BatchClient(Client):
    """The runner's client: its health (``/health``) and its counters."""

    async def stats(self) -> dict[str, Any]:
        return await self._call(BatchRunner.stats)
