"""Records → images, skipping the few whose image cannot be decoded.

One truncated JPEG in ten thousand must not stop a training run or an evaluation hours in,
yet must not vanish silently either. :class:`BadRecords` loads a record's image; when it
cannot be decoded the record is skipped, counted and named by its annotation
``file:line`` (what ``data check`` reports), and only more than ``limit`` such records
(``--max-bad-records``) stop the job, with a :class:`~paligemma_xray.errors.DataError`.

Example:

>>> from pathlib import Path
>>> from paligemma_xray.data.records import Record
>>> bad = BadRecords(limit=1)
>>> record = Record(Path("/nowhere/a.jpg"), "detect fracture", "", "test", Path("/d/t.jsonl"), 7)
>>> bad.load(record) is None, bad.count, bad.where()
(True, 1, ['/d/t.jsonl:7'])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from paligemma_xray.data.images import load_image
from paligemma_xray.data.records import Record
from paligemma_xray.errors import DataError, ImageLoadError

DEFAULT_MAX_BAD_RECORDS = 10  # records with unreadable images tolerated before a job stops

logger = logging.getLogger(__name__)


@dataclass
class BadRecords:
    """Loads records' images; counts and names those that cannot be decoded."""

    limit: int | None = DEFAULT_MAX_BAD_RECORDS  # None: no limit
    skipped: list[tuple[Record, str]] = field(default_factory=list)  # (record, why)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise DataError(f"--max-bad-records must be 0 or more, got {self.limit}")

    @property
    def count(self) -> int:
        return len(self.skipped)

    def where(self) -> list[str]:
        """``file:line`` of every skipped record, in the order met."""
        return [record.where for record, _ in self.skipped]

    def load(self, record: Record) -> Image.Image | None:
        """The record's image, or ``None`` (counted, logged) when it cannot be read.

        Raises:
            DataError: naming the record's ``file:line`` once more than ``limit`` were skipped.
        """
        try:
            return load_image(record.image)
        except ImageLoadError as error:
            self.note(record, error)
            return None

    def note(self, record: Record, error: ImageLoadError) -> None:
        """Count ``record`` as skipped because of ``error`` (for callers that load themselves).

        Raises:
            DataError: naming the record's ``file:line`` once more than ``limit`` were skipped.
        """
        why = error.message
        self.skipped.append((record, why))
        if self.limit is not None and self.count > self.limit:
            raise DataError(
                f"image {record.image} cannot be read ({why}); {self.count} records skipped so far, "
                f"more than --max-bad-records {self.limit} (`paligemma-xray data check` lists them)",
                path=record.source,
                line=record.line,
            ) from None
        logger.warning("%s: record skipped, its image cannot be read: %s", record.where, error)

    def images(self, records: Iterable[Record]) -> Iterator[tuple[Record, Image.Image]]:
        """``(record, image)`` for every record whose image can be read."""
        for record in records:
            image = self.load(record)
            if image is not None:
                yield record, image

    def summary(self) -> dict:
        """For a metrics file: how many were skipped and where."""
        return {"count": self.count, "records": [f"{record.where}: {why}" for record, why in self.skipped]}
