"""An asyncio micro-batcher: concurrent calls become one call of a batch function.

Target-neutral (no ``@serve.batch``, no ``@modal.batched``): the engine owns its batching,
so it behaves the same on every target and in tests. Callers ``await submit(item)``; a
worker task groups what is waiting (up to ``max_batch_size``, waiting at most
``max_wait_s`` after the first item for more to arrive), runs ``run_batch(items)`` in
``executor`` and hands each caller its own result. While one batch runs, new items queue
up and form the next batch, so under load batches fill without any extra delay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
        self.batch_sizes: Counter[int] = Counter()  # for tests and benchmarks

    async def submit(self, item: T) -> R:
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
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def _work(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
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
            batch = [(i, f) for i, f in self._pending[: self.max_batch_size] if not f.cancelled()]
            del self._pending[: self.max_batch_size]
            if self._pending:  # more than one batch was waiting: go again at once
                self._arrived.set()
            else:
                self._arrived.clear()
            if not batch:
                continue
            self.batch_sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [i for i, _ in batch]
                )
            except Exception as e:  # every caller of the batch gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
