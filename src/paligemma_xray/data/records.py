"""Records, problems and data sets: what every layout reader produces.

A :class:`Record` is one annotated image (one JSONL line), a :class:`Problem` is something
wrong with a line, a file or the set as a whole, always with the file and the 1-based line
where it applies, and a :class:`Dataset` holds both. Bad lines are never dropped silently:
a line that cannot become a usable record leaves an ``error`` problem; a record that is
usable but suspicious stays, with a ``warning``.

Example:
    >>> from pathlib import Path
    >>> r = Record(Path("/d/a.jpg"), "detect fracture", "<loc0000><loc0000><loc0512><loc0512> fracture",
    ...            "train", Path("/d/_annotations.train.jsonl"), 3)
    >>> record_targets(r, (1024, 1024)).xyxy.round().tolist()
    [[0.0, 0.0, 513.0, 513.0]]
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from paligemma_xray.errors import DataError
from paligemma_xray.locations import (
    LOC_BINS,
    SEG_CODES,
    SEG_TOKENS_PER_OBJECT,
    Detections,
    classes_from_prefix,
    parse,
)

SPLITS = ("train", "valid", "test")
# Other spellings of the split names seen in exports, mapped to ours.
SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid", "eval": "valid", "testing": "test"}


def normalise_split(name: str) -> str:
    """``"val"`` → ``"valid"``; other names pass through lower-cased."""
    name = name.strip().lower()
    return SPLIT_ALIASES.get(name, name)


@dataclass(frozen=True)
class Record:
    """One annotated image: a line of a JSONL annotation file."""

    image: Path  # absolute path of the image file
    prefix: str  # "detect fracture"
    suffix: str  # "<loc…>×4 fracture ; …" ("" for a negative image)
    split: str  # "train" | "valid" | "test"
    source: Path  # the JSONL file the record came from
    line: int  # 1-based line number in `source`

    @property
    def classes(self) -> list[str]:
        """The class names the prefix asks for (``detect a ; b`` → ``["a", "b"]``)."""
        return classes_from_prefix(self.prefix)

    @property
    def where(self) -> str:
        """``file:line`` of the record, for messages."""
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Problem:
    """Something wrong with a data set, located by file and 1-based line where possible."""

    kind: str  # "missing_image", "bad_json", "malformed_suffix", …
    message: str
    path: Path | None
    line: int | None
    severity: str  # "error" | "warning"
    split: str | None = None  # the split whose annotation file it is in, where known

    def __str__(self) -> str:
        where = "" if self.path is None else (f"{self.path}:{self.line}: " if self.line else f"{self.path}: ")
        return f"{where}{self.severity}: {self.message} [{self.kind}]"

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "path": None if self.path is None else str(self.path),
            "line": self.line,
        }


@dataclass
class Dataset:
    """Records per split, and the problems met while reading them."""

    root: Path
    layout: str  # "roboflow" | "maestro" | "jsonl"
    splits: dict[str, list[Record]]
    problems: list[Problem] = field(default_factory=list)

    def records(self, split: str) -> list[Record]:
        """The records of ``split`` (``"val"`` is accepted for ``"valid"``).

        Raises:
            DataError: naming the root when the data set has no such split.
        """
        key = normalise_split(split)
        if key not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"no split {split!r} in this data set (splits: {have})", path=self.root)
        return self.splits[key]

    def usable(self, split: str) -> list[Record]:
        """The records of ``split`` for training or evaluation: never empty.

        Lines of the split that could not be read are left out with one warning naming the
        first by file and line (``data check`` lists them all).

        Raises:
            DataError: no such split, or not one usable record in it (naming the first problem).
        """
        records = self.records(split)
        key = normalise_split(split)
        dropped = [p for p in self.problems if p.severity == "error" and p.split == key]
        if not records:
            detail = f": {len(dropped)} line(s) could not be used, the first: {dropped[0]}" if dropped else ""
            raise DataError(f"the {key!r} split has no usable record{detail}", path=self.root)
        if dropped:
            logging.getLogger(__name__).warning(
                "%s: %d line(s) of the %r split could not be used and are left out "
                "(`paligemma-xray data check` lists them); the first: %s",
                self.root,
                len(dropped),
                key,
                dropped[0],
            )
        return records

    @property
    def classes(self) -> list[str]:
        """Class names over all prefixes, in order of first appearance."""
        seen: dict[str, None] = {}
        for records in self.splits.values():
            for record in records:
                for name in record.classes:
                    seen.setdefault(name, None)
        return list(seen)

    def __len__(self) -> int:
        return sum(len(records) for records in self.splits.values())


def record_targets(record: Record, image_size: tuple[int, int]) -> Detections:
    """The ground-truth boxes of ``record`` in pixels of an image of ``image_size`` (w, h)."""
    return parse(record.suffix, image_size, classes_from_prefix(record.prefix))


# ---------------------------------------------------------------------------------------------
# Strict validation of a suffix. `locations.parse` is deliberately tolerant (model output
# is messy); annotations must be exact, so this checks the grammar of each object and
# leaves reading the boxes to `parse`.

_OBJECT = re.compile(r"^(?P<locs>(?:<loc\d+>){4})(?P<segs>(?:<seg\d+>)*)\s*(?P<label>[^<>]*?)\s*$")
_NUMBER = re.compile(r"<(loc|seg)(\d+)>")


@dataclass(frozen=True)
class SuffixIssue:
    kind: str  # malformed_suffix | out_of_range | inverted_box | empty_box | unknown_label
    severity: str
    message: str


def suffix_issues(suffix: str, classes: list[str] | None) -> list[SuffixIssue]:
    """Everything wrong with an annotation suffix; ``[]`` for a valid one (or ``""``).

    Example:
        >>> [i.kind for i in suffix_issues("<loc0500><loc0100><loc0400><loc0200> fracture", ["fracture"])]
        ['inverted_box']
    """
    issues: list[SuffixIssue] = []
    text = suffix.strip()
    if not text:
        return issues
    for number, raw in enumerate(text.split(";"), start=1):
        obj = raw.strip()
        which = f"object {number} {obj[:60]!r}"
        if not obj:
            # The boxes around a stray separator are intact (and `parse` skips it): warn, keep.
            issues.append(SuffixIssue("malformed_suffix", "warning", f"empty object {number} (stray ';')"))
            continue
        match = _OBJECT.match(obj)
        if match is None:
            issues.append(
                SuffixIssue(
                    "malformed_suffix",
                    "error",
                    f"{which} is not four <locNNNN> tokens (optionally 16 <segNNN>) followed by a label",
                )
            )
            continue
        locs = [int(m.group(2)) for m in _NUMBER.finditer(match.group("locs"))]
        segs = [int(m.group(2)) for m in _NUMBER.finditer(match.group("segs"))]
        digits = [len(m.group(2)) for m in _NUMBER.finditer(match.group("locs"))]
        if any(d != 4 for d in digits) or any(v >= LOC_BINS for v in locs):
            issues.append(
                SuffixIssue(
                    "out_of_range",
                    "error",
                    f"{which}: location tokens must be <loc0000>..<loc{LOC_BINS - 1:04d}>",
                )
            )
            continue
        if segs and (len(segs) != SEG_TOKENS_PER_OBJECT or any(v >= SEG_CODES for v in segs)):
            issues.append(
                SuffixIssue(
                    "malformed_suffix",
                    "error",
                    f"{which}: expected {SEG_TOKENS_PER_OBJECT} tokens <seg000>..<seg{SEG_CODES - 1:03d}>,"
                    f" got {len(segs)}",
                )
            )
            continue
        y1, x1, y2, x2 = locs
        if y2 < y1 or x2 < x1:
            issues.append(
                SuffixIssue(
                    "inverted_box", "error", f"{which}: inverted box (y1={y1} y2={y2}, x1={x1} x2={x2})"
                )
            )
            continue
        if y2 == y1 or x2 == x1:
            issues.append(SuffixIssue("empty_box", "warning", f"{which}: box has zero width or height"))
        label = match.group("label")
        if not label:
            issues.append(SuffixIssue("malformed_suffix", "error", f"{which}: box without a label"))
        elif classes and label not in classes:
            issues.append(
                SuffixIssue(
                    "unknown_label",
                    "warning",
                    f"{which}: label {label!r} is not in the prefix's classes {classes}",
                )
            )
    return issues
