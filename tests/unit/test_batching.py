"""The micro-batcher: batches form under load, and failures reach the callers of the
batch they belong to, never the worker (which keeps serving) nor a caller left waiting."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_apps.engines.batching import BatcherClosedError, MicroBatcher


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def batcher(run_batch, executor, size=4):
    return MicroBatcher(run_batch, max_batch_size=size, max_wait_s=0.02, executor=executor)


async def test_concurrent_items_share_a_batch_and_each_gets_its_own_result(executor):
    b = batcher(lambda items: [i * 10 for i in items], executor)
    assert await asyncio.gather(*(b.submit(i) for i in range(6))) == [0, 10, 20, 30, 40, 50]
    assert max(b.batch_sizes) > 1 and sum(k * v for k, v in b.batch_sizes.items()) == 6
    await b.close()


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs(executor):
    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    b = batcher(run, executor)
    results = await asyncio.gather(b.submit("a"), b.submit("bad"), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert await b.submit("c") == "C"
    await b.close()


async def test_a_wrong_number_of_results_is_an_error_not_a_hang(executor):
    b = batcher(lambda items: items[:-1], executor)
    results = await asyncio.wait_for(
        asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True), 5
    )
    assert all(isinstance(r, RuntimeError) and "results" in str(r) for r in results)
    await b.close()


async def test_close_fails_the_running_batch_and_the_queued_items(executor):
    release = threading.Event()

    def slow(items):
        release.wait(5)
        return items

    b = batcher(slow, executor, size=1)
    running = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.1)  # the first batch is in the executor
    queued = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0)
    await b.close()
    release.set()
    for call in (running, queued):
        with pytest.raises(BatcherClosedError):
            await asyncio.wait_for(call, 5)
    with pytest.raises(BatcherClosedError):
        await b.submit(3)
