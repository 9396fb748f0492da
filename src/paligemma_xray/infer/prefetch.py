"""Load inputs off the main thread, in order: a small thread-pool prefetcher.

Why: ``predict`` (and any loop that feeds a model from files) would otherwise decode each
image on the thread that drives the model, so the accelerator idles while JPEG, PNG or DICOM
pixels are decoded. :class:`Prefetch` keeps up to ``ahead`` items loading in ``workers``
threads and hands results back in input order. Threads suffice: PIL's decoders, numpy and
torch release the GIL while they work, and threads need no pickling of the model, the
tokenizer or a ``load`` closure (a ``DataLoader``'s worker processes would).

An error raised by ``load`` is raised again by the iterator at that item's place, so the
caller sees exactly the error (a :class:`~paligemma_xray.errors.ImageLoadError` naming the
file) it would have seen loading it itself; nothing after it is consumed.

>>> loader = Prefetch(range(5), lambda i: i * i, workers=2)
>>> list(loader)
[(0, 0), (1, 1), (2, 4), (3, 9), (4, 16)]
>>> loader.wait_s >= 0.0
True
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

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
                    queue.append((item, pool.submit(self.load, item)))
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


def default_workers() -> int:
    """Loading threads for ``predict``: up to 4, never more than the CPUs the process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


__all__ = ["Prefetch", "default_workers"]
