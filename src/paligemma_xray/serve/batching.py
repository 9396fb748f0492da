"""Dynamic batching of concurrent requests through one model.

The model is a single, large, non-reentrant object: it runs in exactly one worker thread.
Requests arrive on the asyncio event loop, wait in a bounded queue, and a single asyncio
task gathers them into batches (at most ``max_batch`` images, waiting at most
``max_wait_s`` after the oldest request arrived for companions) and hands each batch to
the model thread. Each request gets its result through its own future.

A full queue is refused at once (:class:`QueueFullError`) instead of growing without
bound: under overload a quick 503 is better for the caller than a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from PIL import Image

Result = TypeVar("Result")

# (images, prompt) -> one result per image, in order. Runs in the model thread.
BatchFunction = Callable[[list[Image.Image], str], Sequence[Any]]


class QueueFullError(Exception):
    """The queue holds ``capacity`` waiting requests already; try again later."""

    def __init__(self, capacity: int, retry_after_s: int):
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        super().__init__(f"the request queue is full ({capacity} waiting); retry in {retry_after_s} s")


class QueueClosedError(Exception):
    """The queue is not running (not started yet, or shutting down)."""


@dataclass(frozen=True)
class BatchInfo:
    """How one request went through the queue (reported back to the client)."""

    batch_size: int  # images in the model call this request was part of
    queue_s: float  # from submission to the start of its model call
    model_s: float  # duration of the model call


@dataclass
class _Job:
    image: Image.Image
    prompt: str
    future: asyncio.Future
    enqueued: float  # loop.time() at submission


@dataclass
class BatchStats:
    """Counters for observing the queue (exposed by ``/healthz`` and ``/v1/model``)."""

    requests: int = 0  # jobs accepted into the queue
    rejected_full: int = 0  # jobs refused because the queue was full
    model_calls: int = 0  # calls into the model (one per batch)
    images: int = 0  # images that went through the model
    failed_calls: int = 0  # model calls that raised
    model_seconds: float = 0.0  # time spent inside the model
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> number of calls

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rejected_full": self.rejected_full,
            "model_calls": self.model_calls,
            "images": self.images,
            "failed_calls": self.failed_calls,
            "model_seconds": round(self.model_seconds, 4),
            "mean_batch_size": round(self.images / self.model_calls, 3) if self.model_calls else None,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }


class BatchingQueue(Generic[Result]):
    """Bounded queue + one batching task + one model thread.

    Use from a running event loop: ``await queue.start()``, then ``await queue.submit(image,
    prompt)`` from any number of concurrent tasks, and ``await queue.stop()`` at shutdown.
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.010,
        capacity: int = 64,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.stats = BatchStats()
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards stats read from other threads (the counters are written on the loop thread).
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the batching task and the model thread on the running loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        # One thread: the model is not re-entrant and batching is where the parallelism is.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paligemma-model")
        self._worker = asyncio.create_task(self._work(), name="paligemma-batcher")

    async def stop(self) -> None:
        """Stop taking work, fail whatever still waits, and release the model thread."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(QueueClosedError("the server is shutting down"))
        if self._executor is not None:
            # Waits for a model call in flight; it cannot be interrupted anyway.
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- submission -------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the batch in the model now)."""
        return len(self._pending)

    def retry_after_s(self) -> int:
        """A rough time for the queue to drain: batches to go × mean model-call time."""
        with self._lock:
            calls, seconds = self.stats.model_calls, self.stats.model_seconds
        per_call = seconds / calls if calls else 1.0
        batches = math.ceil((len(self._pending) + 1) / self.max_batch)
        return max(1, math.ceil(batches * per_call))

    async def submit(self, image: Image.Image, prompt: str) -> tuple[Result, BatchInfo]:
        """Queue one image; wait for its result. Raises :class:`QueueFullError` when full."""
        if not self.running or self._loop is None or self._wakeup is None:
            raise QueueClosedError("the batching queue is not running")
        if len(self._pending) >= self.capacity:
            with self._lock:
                self.stats.rejected_full += 1
            raise QueueFullError(self.capacity, self.retry_after_s())
        job = _Job(image=image, prompt=prompt, future=self._loop.create_future(), enqueued=self._loop.time())
        self._pending.append(job)
        with self._lock:
            self.stats.requests += 1
        self._wakeup.set()
        return await job.future

    # -- the batching task ------------------------------------------------------------------

    def _take_batch(self) -> list[_Job]:
        """Pop up to ``max_batch`` live jobs sharing the oldest job's prompt, keeping order.

        The model takes one prompt per call, so jobs with another prompt stay queued for a
        later batch (in their original order).
        """
        while self._pending and self._pending[0].future.done():  # caller went away
            self._pending.popleft()
        if not self._pending:
            return []
        prompt = self._pending[0].prompt
        batch: list[_Job] = []
        kept: collections.deque[_Job] = collections.deque()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():
                continue
            if len(batch) < self.max_batch and job.prompt == prompt:
                batch.append(job)
            else:
                kept.append(job)
        self._pending = kept
        return batch

    def _ready_count(self) -> int:
        prompt = self._pending[0].prompt
        return sum(1 for job in self._pending if job.prompt == prompt and not job.future.done())

    async def _work(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop = self._loop
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for companions, counted from the oldest job's arrival: a request never
            # waits more than max_wait_s for others, and jobs that piled up while the model
            # was busy leave at once.
            deadline = self._pending[0].enqueued + self.max_wait_s
            while self._pending and self._ready_count() < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # not the builtin on Python 3.10
                    break
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        assert self._loop is not None and self._executor is not None
        images = [job.image for job in batch]
        started_loop = self._loop.time()
        started = time.perf_counter()
        try:
            results = await self._loop.run_in_executor(
                self._executor, self.run_batch, images, batch[0].prompt
            )
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} images")
        except asyncio.CancelledError:
            # stop() during a model call: nobody will hear from this batch, so say so now.
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(QueueClosedError("the server is shutting down"))
            raise
        except Exception as error:  # a model failure fails this batch only, not the server
            elapsed = time.perf_counter() - started
            with self._lock:
                self.stats.failed_calls += 1
                self.stats.model_calls += 1
                self.stats.model_seconds += elapsed
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.model_calls += 1
            self.stats.images += len(batch)
            self.stats.model_seconds += elapsed
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        for job, result in zip(batch, results):
            if not job.future.done():
                info = BatchInfo(batch_size=len(batch), queue_s=started_loop - job.enqueued, model_s=elapsed)
                job.future.set_result((result, info))

    def snapshot(self) -> dict[str, Any]:
        """Counters and settings, JSON-ready."""
        with self._lock:
            stats = self.stats.as_dict()
        return {
            **stats,
            "queue_depth": len(self._pending),
            "queue_capacity": self.capacity,
            "max_batch": self.max_batch,
            "max_wait_ms": round(self.max_wait_s * 1000, 3),
        }
