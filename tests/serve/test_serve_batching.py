"""The batching queue on its own, with a fake model whose calls are recorded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from PIL import Image

from paligemma_xray.serve.batching import BatchingQueue, QueueClosedError, QueueFullError


class RecordingModel:
    """Returns ``(prompt, image width)`` per image; records batches and the calling thread."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None):
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[tuple[str, list[int]]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, images: list[Image.Image], prompt: str) -> list[tuple[str, int]]:
        self.threads.add(threading.current_thread().name)
        self.release.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append((prompt, [im.width for im in images]))
        if prompt == self.fail_on:
            raise RuntimeError("model exploded")
        return [(prompt, im.width) for im in images]


def image(width: int) -> Image.Image:
    return Image.new("RGB", (width, 4))


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_model_calls_and_get_their_own_results():
    model = RecordingModel(delay_s=0.01)

    async def main():
        queue = BatchingQueue(model, max_batch=4, max_wait_s=0.05, capacity=64)
        await queue.start()
        try:
            results = await asyncio.gather(*(queue.submit(image(w), "detect fracture") for w in range(1, 11)))
        finally:
            await queue.stop()
        return queue, results

    queue, results = run(main())
    # Every caller gets the answer for its own image, whatever batch it landed in.
    assert [r[0] for r in results] == [("detect fracture", w) for w in range(1, 11)]
    assert all(1 <= info.batch_size <= 4 for _, info in results)
    assert sum(len(widths) for _, widths in model.calls) == 10
    assert len(model.calls) == 3  # 4 + 4 + 2: all ten arrived within the wait window
    assert max(len(widths) for _, widths in model.calls) == 4
    assert queue.stats.model_calls == 3 and queue.stats.images == 10 and queue.stats.requests == 10
    # The model ran in its one dedicated thread, never on the event loop.
    assert len(model.threads) == 1 and next(iter(model.threads)).startswith("paligemma-model")


def test_max_batch_one_means_one_call_per_request():
    model = RecordingModel()

    async def main():
        queue = BatchingQueue(model, max_batch=1, max_wait_s=0.05, capacity=64)
        await queue.start()
        try:
            await asyncio.gather(*(queue.submit(image(w), "p") for w in range(1, 6)))
        finally:
            await queue.stop()

    run(main())
    assert [widths for _, widths in model.calls] == [[1], [2], [3], [4], [5]]


def test_a_lone_request_waits_for_the_window_then_goes_alone():
    # No upper bound on wall time here (a busy machine stretches any): that a lone request
    # is answered at all, alone, shows it did not wait for a full batch; speed lives in
    # benchmarks/serve.py. The lower bound holds on any machine: it waited for company.
    model = RecordingModel()

    async def main():
        queue = BatchingQueue(model, max_batch=8, max_wait_s=0.05, capacity=8)
        await queue.start()
        try:
            return await asyncio.wait_for(queue.submit(image(3), "p"), timeout=60)
        finally:
            await queue.stop()

    _, info = run(main())
    assert info.batch_size == 1 and model.calls == [("p", [3])]
    assert info.queue_s >= 0.04


def test_different_prompts_go_to_different_model_calls_in_order():
    model = RecordingModel()

    async def main():
        queue = BatchingQueue(model, max_batch=8, max_wait_s=0.05, capacity=64)
        await queue.start()
        try:
            jobs = [queue.submit(image(w), "a" if w % 2 else "b") for w in range(1, 7)]
            return await asyncio.gather(*jobs)
        finally:
            await queue.stop()

    results = run(main())
    assert [r[0] for r in results] == [("a" if w % 2 else "b", w) for w in range(1, 7)]
    assert sorted(model.calls) == [("a", [1, 3, 5]), ("b", [2, 4, 6])]


def test_full_queue_refuses_at_once_with_a_retry_time():
    model = RecordingModel()
    model.release.clear()  # the model blocks until released: the queue fills behind it

    async def main():
        queue = BatchingQueue(model, max_batch=1, max_wait_s=0.0, capacity=2)
        await queue.start()
        try:
            first = asyncio.create_task(queue.submit(image(1), "p"))
            while not model.threads:  # the first job is inside the model now
                await asyncio.sleep(0.005)
            waiting = [asyncio.create_task(queue.submit(image(w), "p")) for w in (2, 3)]
            await asyncio.sleep(0.01)
            assert queue.depth == 2
            with pytest.raises(QueueFullError) as refused:
                await queue.submit(image(4), "p")
            model.release.set()
            done = await asyncio.gather(first, *waiting)
            return refused.value, done, queue.stats
        finally:
            model.release.set()
            await queue.stop()

    refused, done, stats = run(main())
    assert refused.capacity == 2 and refused.retry_after_s >= 1
    assert [r[0][1] for r in done] == [1, 2, 3]
    assert stats.rejected_full == 1 and stats.requests == 3


def test_a_failing_batch_fails_its_requests_and_the_queue_keeps_working():
    model = RecordingModel(fail_on="boom")

    async def main():
        queue = BatchingQueue(model, max_batch=4, max_wait_s=0.01, capacity=8)
        await queue.start()
        try:
            with pytest.raises(RuntimeError, match="exploded"):
                await queue.submit(image(1), "boom")
            result, _ = await queue.submit(image(2), "fine")
            return result, queue.stats
        finally:
            await queue.stop()

    result, stats = run(main())
    assert result == ("fine", 2)
    assert stats.failed_calls == 1 and stats.model_calls == 2


def test_submit_needs_a_running_queue_and_stop_fails_waiting_jobs():
    model = RecordingModel()
    model.release.clear()

    async def main():
        queue = BatchingQueue(model, max_batch=1, max_wait_s=0.0, capacity=4)
        with pytest.raises(QueueClosedError):
            await queue.submit(image(1), "p")
        await queue.start()
        first = asyncio.create_task(queue.submit(image(1), "p"))
        while not model.threads:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(queue.submit(image(2), "p"))
        await asyncio.sleep(0.01)
        model.release.set()
        await queue.stop()
        return await asyncio.gather(first, second, return_exceptions=True)

    # The failure this guards against is a hang: a time limit turns it into a failure.
    first, second = run(asyncio.wait_for(main(), timeout=30))
    assert isinstance(second, QueueClosedError)
    # The job already in the model when stop() came finished or was cancelled.
    assert first == ("p", 1) or isinstance(first, asyncio.CancelledError | QueueClosedError), first


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_wait_s": -1.0}, {"capacity": 0}], ids=["batch", "wait", "capacity"]
)
def test_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        BatchingQueue(RecordingModel(), **kwargs)
