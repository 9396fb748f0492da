"""Training examples and batches: data order, augmentations, image-feature cache.

Tokenising, masks and pixels come from :func:`paligemma_xray.model.processing.build_batch`
(the one place for them); this module only decides *which* records, in which order, and how
each is augmented.

Determinism, which exact resuming relies on: the data position is a plain counter ``k`` of
examples seen. Example ``k`` is record ``perm(epoch)[k % n]`` with ``epoch = k // n`` and a
permutation drawn from ``(seed, epoch)``; its augmentations are drawn from ``(seed, k)``.
So step ``s`` always sees the same examples with the same augmentations, on one process or
many, fresh or resumed, and nothing but the step counter needs saving.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from paligemma_xray.data.bad_records import BadRecords
from paligemma_xray.errors import DataError, ImageLoadError
from paligemma_xray.locations import LOC_BINS, SEPARATOR, loc_token
from paligemma_xray.model.processing import build_batch

_BOX = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>")
_SEG = re.compile(r"<seg\d{3}>")


@dataclass(frozen=True)
class Augment:
    """Which augmentations are on (all off: big_vision's recipe)."""

    shuffle_objects: bool = False
    """Reorder the `` ; ``-separated objects of the suffix."""
    hflip: float = 0.0
    """Probability of a horizontal flip (boxes mirrored)."""
    jitter: float = 0.0
    """Brightness and contrast drawn in [1 - jitter, 1 + jitter]."""

    @property
    def changes_pixels(self) -> bool:
        """True when the image an example shows can differ from its file (cache unusable)."""
        return self.hflip > 0 or self.jitter > 0


def shuffle_objects(suffix: str, rng: np.random.Generator) -> str:
    """The suffix's objects in a random order (text with fewer than two objects unchanged)."""
    objects = suffix.split(SEPARATOR)
    if len(objects) < 2:
        return suffix
    return SEPARATOR.join(objects[i] for i in rng.permutation(len(objects)))


def mirror_suffix(suffix: str) -> str | None:
    """The suffix of the horizontally mirrored image: x → 1023 - x, x1 and x2 swapped.

    ``None`` when the suffix holds segmentation tokens: their codes describe an unmirrored
    mask, so such an example is not flipped.
    """
    if _SEG.search(suffix):
        return None
    top = LOC_BINS - 1

    def flip(match: re.Match) -> str:
        y1, x1, y2, x2 = (int(g) for g in match.groups())
        return "".join(loc_token(b) for b in (y1, top - x2, y2, top - x1))

    return _BOX.sub(flip, suffix)


def jitter_image(image: Image.Image, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Light brightness/contrast change, as an RGB uint8 array."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    contrast = rng.uniform(1 - strength, 1 + strength)
    brightness = rng.uniform(-strength, strength) * 255.0
    mean = pixels.mean()
    return np.clip((pixels - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)


class Examples:
    """The training stream: example ``k`` → (record, image, prefix, suffix), augmented."""

    def __init__(
        self,
        records: Sequence,
        augment: Augment,
        seed: int,
        load_image,
        bad_records: BadRecords | None = None,
    ) -> None:
        self.records = list(records)
        self.augment = augment
        self.seed = seed
        self.load_image = load_image
        # Records whose image cannot be decoded: skipped (the next readable record stands in,
        # the same on every run and resume), counted, named by file:line; past the limit, stop.
        self.bad_records = bad_records if bad_records is not None else BadRecords()
        self._unreadable: set[int] = set()
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def image(self, index: int) -> tuple[int, Image.Image]:
        """``(index, image)`` of record ``index``, or of the next readable record if it cannot be read."""
        n = len(self.records)
        for offset in range(n):
            candidate = (index + offset) % n
            if candidate in self._unreadable:
                continue
            record = self.records[candidate]
            try:
                return candidate, self.load_image(record.image)
            except ImageLoadError as error:
                self._unreadable.add(candidate)
                self.bad_records.note(record, error)  # DataError past the limit
        raise DataError(f"not one of the {n} training images can be read")

    def record_index(self, k: int) -> int:
        """Index into ``records`` of example ``k`` (a fresh permutation every epoch)."""
        n = len(self.records)
        epoch = k // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        assert self._perm is not None  # set above on the first call
        return int(self._perm[k % n])

    def example(self, k: int) -> tuple[int, Image.Image | np.ndarray, str, str]:
        """(record index, image, prefix, suffix) of example ``k``."""
        index, image = self.image(self.record_index(k))
        record = self.records[index]
        suffix = record.suffix
        rng = np.random.default_rng([self.seed, 1, k])  # (seed, 1, k): apart from permutations
        if self.augment.shuffle_objects:
            suffix = shuffle_objects(suffix, rng)
        if self.augment.hflip > 0 and rng.random() < self.augment.hflip:
            mirrored = mirror_suffix(suffix)
            if mirrored is not None:
                suffix = mirrored
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment.jitter > 0:
            return index, jitter_image(image, self.augment.jitter, rng), record.prefix, suffix
        return index, image, record.prefix, suffix

    def batch(
        self, positions: Sequence[int], processor, max_length: int
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Model batch for examples ``positions`` and the record index of each row."""
        rows = [self.example(k) for k in positions]
        batch = build_batch(
            processor,
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            max_length=max_length,
        )
        return batch, [r[0] for r in rows]


def step_positions(step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """Example counters of this process's micro-batches at 0-based optimiser ``step``.

    The global batch ``[step·B, (step+1)·B)`` is cut into ``world`` equal contiguous parts,
    each into ``grad_accum`` micro-batches; ``B`` must divide by ``world · grad_accum``.
    """
    per_rank = batch_size // world
    start = step * batch_size + rank * per_rank
    micro = per_rank // grad_accum
    return [list(range(start + i * micro, start + (i + 1) * micro)) for i in range(grad_accum)]


class FeatureCache:
    """Image embeddings (vision tower + projector output) per record, computed once.

    Valid only while the vision tower and projector are frozen and images are not
    augmented; the loop checks both before using it.
    """

    def __init__(self, storage: torch.device | str | None = None) -> None:
        self.storage = torch.device(storage) if storage is not None else None
        self._features: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def get(self, compute, keys: Sequence[Hashable], pixel_values: torch.Tensor) -> torch.Tensor:
        """Features for the batch rows ``keys``, on ``pixel_values``' device; missing rows
        are computed with ``compute(pixel_values_subset)`` (under ``no_grad``) and kept (on
        ``storage``, default: where they were computed)."""
        missing = [i for i, key in enumerate(keys) if key not in self._features]
        if missing:
            with torch.no_grad():
                fresh = compute(pixel_values[missing])
            for i, row in zip(missing, fresh):
                # A row of a batched output would keep the whole batch's storage alive.
                row = row.detach()
                row = row.to(self.storage) if self.storage is not None else row
                self._features.setdefault(keys[i], row.clone())
        return torch.stack([self._features[key] for key in keys]).to(pixel_values.device, non_blocking=True)
