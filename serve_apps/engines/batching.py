"""An asyncio micro-batcher: concurrent calls become one call of a batch function.

Target-neutral (no ``@serve.batch``, no ``@modal.batched``): the engine owns its batching,
so it behaves the same on every target and in tests. Callers ``await submit(item)``; a
worker task groups what is waiting (up to ``max_batch_size``, waiting at most
``max_wait_s`` after the first item for more to arrive), runs ``run_batch(items)`` in
``executor`` and hands each caller its own result. While one batch runs, new items queue
up and form the next batch, so under load batches fill without any extra delay.

Failures stay with the batch they belong to: if ``run_batch`` raises, or returns a wrong
number of results, every caller of that batch gets the error and the worker goes on with
the next batch. ``close()`` fails every caller still waiting (queued or in the batch that
is running) with :class:`BatcherClosedError`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """The batcher was closed while the call waited (the service is shutting down)."""


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        executor: Executor,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._max_wait_s = max(0.0, max_wait_s)
        self._executor = executor
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # for tests and benchmarks

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:  # fails the callers of the batch that runs, if any
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        _fail([f for _, f in self._pending], BatcherClosedError("the batcher was closed"))
        self._pending.clear()

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            await self._arrived.wait()
            deadline = time.monotonic() + self._max_wait_s
            while len(self._pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = [(i, f) for i, f in self._pending[: self.max_batch_size] if not f.done()]
            del self._pending[: self.max_batch_size]
            if self._pending:  # more than one batch was waiting: go again at once
                self._arrived.set()
            else:
                self._arrived.clear()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """One batch; whatever goes wrong goes to its callers, never to the worker."""
        futures = [f for _, f in batch]
        self.batch_sizes[len(batch)] += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [i for i, _ in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the batch function returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:  # the worker is stopped (close): so is the batch
            _fail(futures, BatcherClosedError("the batcher was closed"))
            raise
        except Exception as e:  # every caller of the batch gets the failure
            _fail(futures, e)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)


def _fail(futures: Sequence[asyncio.Future[Any]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
