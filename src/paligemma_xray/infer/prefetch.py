"""Inputs and outputs off the main thread: a thread-pool prefetcher and a background writer.

Why: ``predict`` (and any loop that feeds a model from files) would otherwise decode each
image on the thread that drives the model, so the accelerator idles while JPEG, PNG or DICOM
pixels are decoded. :class:`Prefetch` keeps up to ``ahead`` items loading in ``workers``
threads and hands results back in input order. Threads suffice: PIL's decoders, numpy and
torch release the GIL while they work, and threads need no pickling of the model, the
tokenizer or a ``load`` closure (a ``DataLoader``'s worker processes would).

An error raised by ``load`` is raised again by the iterator at that item's place, so the
caller sees exactly the error (a :class:`~paligemma_xray.errors.ImageLoadError` naming the
file) it would have seen loading it itself; nothing after it is consumed.

The other side, :class:`Background`, runs output tasks (annotated PNGs, per-image JSON) in
threads so that the model is not kept waiting while a PNG is encoded (at 1024 px that takes
longer than decoding a batch); at most ``pending`` tasks queue up, and the first error of a
task is raised on the caller's thread at the next ``submit`` or at ``close``.

>>> loader = Prefetch(range(5), lambda i: i * i, workers=2)
>>> list(loader)
[(0, 0), (1, 1), (2, 4), (3, 9), (4, 16)]
>>> loader.wait_s >= 0.0
True
>>> written = []
>>> with Background(workers=2) as writer:
...     for i in range(3):
...         writer.submit(written.append, i)
>>> sorted(written)
[0, 1, 2]
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar, cast

from paligemma_xray.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


class Prefetch(Generic[T, R]):
    """``(item, load(item))`` for every item, in order, ``load`` running in threads.

    Args:
        items: any iterable; it is read lazily, on the consumer's thread, never more than
            ``ahead`` items in advance (so a folder walk stays a stream).
        load: the function to run off the main thread (e.g. ``data.load_image``).
        workers: threads; 0 loads on the consumer's thread (no prefetching), which is the
            baseline the benchmark compares against.
        ahead: items in flight at most (default ``2 × workers``); bounds memory to that
            many loaded items.

    Attributes:
        wait_s: seconds the consumer spent blocked waiting for loaded items (with
            ``workers=0``: the whole loading time), what "the model waits for input" means.
        loaded: items handed out so far.
    """

    def __init__(
        self,
        items: Iterable[T],
        load: Callable[[T], R],
        *,
        workers: int = 2,
        ahead: int | None = None,
    ) -> None:
        if workers < 0:
            raise ConfigError(f"loading workers must be at least 0, got {workers}")
        self.items = items
        self.load = load
        self.workers = workers
        self.ahead = max(1, ahead if ahead is not None else 2 * workers)
        self.wait_s = 0.0
        self.loaded = 0

    def __iter__(self) -> Iterator[tuple[T, R]]:
        if self.workers == 0:
            yield from self._inline()
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="prefetch")
        queue: deque[tuple[T, Future[R]]] = deque()
        source = iter(self.items)
        try:
            exhausted = False
            while True:
                while not exhausted and len(queue) < self.ahead:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    queue.append((cast(T, item), pool.submit(self.load, cast(T, item))))
                if not queue:
                    return
                item, future = queue.popleft()
                start = time.perf_counter()
                try:
                    result = future.result()
                finally:
                    self.wait_s += time.perf_counter() - start
                self.loaded += 1
                yield item, result
        finally:
            # Early stop (consumer broke off, or an error): drop what has not started.
            for _, future in queue:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _inline(self) -> Iterator[tuple[T, R]]:
        for item in self.items:
            start = time.perf_counter()
            try:
                result = self.load(item)
            finally:
                self.wait_s += time.perf_counter() - start
            self.loaded += 1
            yield item, result


_END: object = object()


class Background:
    """Side-effect tasks (writing outputs) in ``workers`` threads; ``workers=0`` runs each
    task at once on the caller's thread.

    ``submit`` blocks while ``pending`` tasks (default ``4 × workers``) are unfinished, so
    memory stays bounded; ``wait_s`` is the time it blocked (what the model waited for
    outputs). Use as a context manager: leaving the block waits for every task and raises
    the first task error; leaving it with an error of its own drops the tasks not started.
    """

    def __init__(self, workers: int = 2, pending: int | None = None) -> None:
        if workers < 0:
            raise ConfigError(f"writing workers must be at least 0, got {workers}")
        self.workers = workers
        self.pending = max(1, pending if pending is not None else 4 * workers)
        self.wait_s = 0.0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="writer") if workers else None
        self._futures: deque[Future] = deque()

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` in the background (raises an earlier task's error, if any)."""
        if self._pool is None:  # inline: the caller waits the whole task
            start = time.perf_counter()
            try:
                fn(*args)
            finally:
                self.wait_s += time.perf_counter() - start
            return
        self._reap(block=len(self._futures) >= self.pending)
        self._futures.append(self._pool.submit(fn, *args))

    def _reap(self, block: bool) -> None:
        while self._futures and (self._futures[0].done() or block):
            start = time.perf_counter()
            future = self._futures.popleft()
            try:
                future.result()  # raises the task's error here, on the caller's thread
            finally:
                self.wait_s += time.perf_counter() - start
            block = False

    def close(self) -> None:
        """Wait for every task; raise the first error."""
        try:
            while self._futures:
                self._reap(block=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
            return
        for future in self._futures:  # already failing: do not start more writes
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Loading threads for ``predict``: up to 4, never more than the CPUs the process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


__all__ = ["Background", "Prefetch", "default_workers"]
