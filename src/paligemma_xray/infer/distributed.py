"""Data-parallel inference: shard images by rank, gather, merge into one result.

Launch with ``torchrun --nproc-per-node N …`` or ``accelerate launch …``: both set
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Image ``i`` (in the deterministic order of the
input) goes to rank ``i % world_size``; results carry their index and are merged in
index order on every rank, so the merged result is the one a single process produces.
One process (no launcher) is a world of size 1 and touches no process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """This rank's device: its own GPU under a launcher, else CPU."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu"


def world() -> World:
    """The current world, initialising the process group once under a launcher.

    Backend: NCCL with GPUs, gloo on CPU (how the tests run it).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(
        rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def shard(items: Iterable[T], w: World) -> Iterator[tuple[int, T]]:
    """``(index, item)`` for the items of this rank, streaming (nothing is listed)."""
    for index, item in enumerate(items):
        if index % w.size == w.rank:
            yield index, item


def gather_indexed(results: list[tuple[int, Any]], w: World) -> list[Any]:
    """All ranks' ``(index, result)`` pairs merged in index order (on every rank)."""
    if w.size > 1:
        parts: list[list[tuple[int, Any]] | None] = [None] * w.size
        dist.all_gather_object(parts, results)
        results = [pair for part in parts for pair in (part or [])]
    return [value for _, value in sorted(results, key=lambda pair: pair[0])]


def barrier(w: World) -> None:
    if w.size > 1:
        dist.barrier()
