"""The ``<locNNNN>`` / ``<segNNN>`` codec: boxes to PaliGemma text and back.

PaliGemma writes one object as four location tokens, y before x, optionally sixteen
segmentation tokens, then its label; objects are separated by ``" ; "``::

    <loc0390><loc0241><loc0472><loc0440> fracture ; <loc0100><loc0200><loc0300><loc0400> fracture

A coordinate normalised to 0..1 is encoded as ``round(v * 1023)`` clipped to 0..1023 and
decoded as ``k / 1023`` (big_vision's convention; supervision and the original blog divide
by 1024, a 0.1% difference).

:func:`parse` is tolerant: it never raises on any string. What it cannot use it drops and
counts in :attr:`Detections.parse_issues`, so that a caller can report how many model
outputs were malformed instead of silently losing them.

Example:
    >>> text = encode([[10, 20, 110, 220]], ["fracture"], image_size=(512, 512))
    >>> text
    '<loc0040><loc0020><loc0440><loc0220> fracture'
    >>> found = parse(text, image_size=(512, 512), classes=["fracture"])
    >>> found.class_name, found.class_id.tolist()
    (['fracture'], [0])
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOC_BINS = 1024
SEG_CODES = 128
SEG_TOKENS_PER_OBJECT = 16
SEPARATOR = " ; "
DEFAULT_PROMPT = "detect fracture"

# Counted in Detections.parse_issues. All but "unknown_label" and "partial_seg" describe
# objects that were dropped; those two describe objects that were kept.
PARSE_ISSUE_KINDS = ("truncated", "inverted", "empty_label", "unknown_label", "partial_seg")

_TOKEN = re.compile(r"<loc(\d{4})>|<seg(\d{3})>")
# A label ends at the object separator, the next location/segmentation token, a line break
# or a special token the decoder may leave in the text.
_LABEL_END = re.compile(r";|<loc\d{4}>|<seg\d{3}>|\n|<(?:eos|bos|pad|unk|image|/s)>")


def loc_token(bin_index: int) -> str:
    """The location token for ``bin_index`` (0..1023), e.g. ``<loc0042>``."""
    return f"<loc{bin_index:04d}>"


def seg_token(code: int) -> str:
    """The segmentation token for ``code`` (0..127), e.g. ``<seg007>``."""
    return f"<seg{code:03d}>"


def _empty_issues() -> dict[str, int]:
    return dict.fromkeys(PARSE_ISSUE_KINDS, 0)


@dataclass
class Detections:
    """Boxes found on one image (or annotated on it).

    Attributes:
        xyxy: ``(N, 4)`` float32 pixel boxes, x1 y1 x2 y2.
        class_name: the N labels as written.
        class_id: ``(N,)`` int64 index into the class list; -1 where the label is not in it.
        score: ``(N,)`` float32 confidences in (0, 1], or None (ground truth, unscored).
        seg_codes: ``(N, 16)`` int16 VQ codes of the mask; rows of -1 where none were given.
        image_size: ``(width, height)`` of the image the boxes refer to.
        parse_issues: counts of what the parser dropped or flagged (see PARSE_ISSUE_KINDS).
        masks: None (no masks), or one COCO RLE per object (``{"size": [h, w], "counts": str}``
            over the whole image; :mod:`paligemma_xray.masks`), ``None`` for an object without
            one. Predictions get them from their ``<seg>`` codes
            (:func:`paligemma_xray.infer.masks.decode_masks`), ground truth from its codes or
            polygons.

    Example:
        >>> d = Detections.empty((640, 480))
        >>> len(d), d.image_size
        (0, (640, 480))
    """

    xyxy: np.ndarray
    class_name: list[str]
    class_id: np.ndarray
    score: np.ndarray | None
    seg_codes: np.ndarray
    image_size: tuple[int, int]
    parse_issues: dict[str, int] = field(default_factory=_empty_issues)
    masks: list[dict[str, Any] | None] | None = None

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        n = len(self.xyxy)
        self.class_name = [str(name) for name in self.class_name]
        self.class_id = np.asarray(self.class_id, dtype=np.int64).reshape(-1)
        if self.score is not None:
            self.score = np.asarray(self.score, dtype=np.float32).reshape(-1)
        self.seg_codes = np.asarray(self.seg_codes, dtype=np.int16).reshape(-1, SEG_TOKENS_PER_OBJECT)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.parse_issues = {**_empty_issues(), **self.parse_issues}
        lengths = {len(self.class_name), len(self.class_id), len(self.seg_codes)}
        if self.score is not None:
            lengths.add(len(self.score))
        if self.masks is not None:
            self.masks = list(self.masks)
            lengths.add(len(self.masks))
        if lengths != {n}:
            raise ValueError(f"Detections fields disagree in length: {n} boxes, other lengths {lengths}")

    @classmethod
    def empty(cls, image_size: tuple[int, int], scored: bool = True) -> Detections:
        """No detections on an image of ``image_size`` (width, height)."""
        return cls(
            xyxy=np.zeros((0, 4), np.float32),
            class_name=[],
            class_id=np.zeros(0, np.int64),
            score=np.zeros(0, np.float32) if scored else None,
            seg_codes=np.zeros((0, SEG_TOKENS_PER_OBJECT), np.int16),
            image_size=image_size,
        )

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> Detections:
        """Select detections with a boolean mask, an index array or a slice."""
        selected = np.arange(len(self))[index]
        selected = np.atleast_1d(selected)
        return Detections(
            xyxy=self.xyxy[selected],
            class_name=[self.class_name[i] for i in selected],
            class_id=self.class_id[selected],
            score=None if self.score is None else self.score[selected],
            seg_codes=self.seg_codes[selected],
            image_size=self.image_size,
            parse_issues=dict(self.parse_issues),
            masks=None if self.masks is None else [self.masks[i] for i in selected],
        )

    @property
    def has_masks(self) -> bool:
        """True when at least one object carries a mask."""
        return self.masks is not None and any(m is not None for m in self.masks)

    def with_threshold(self, threshold: float) -> Detections:
        """Detections whose score is at least ``threshold`` (all of them when unscored)."""
        if self.score is None:
            return self
        return self[self.score >= threshold]

    def to_supervision(self):
        """The same boxes as ``supervision.Detections`` (``class_name`` in ``data``)."""
        import supervision as sv

        return sv.Detections(
            xyxy=self.xyxy.astype(np.float32),
            class_id=self.class_id.copy(),
            confidence=None if self.score is None else self.score.copy(),
            data={"class_name": np.array(self.class_name, dtype=str)},
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reads it back."""
        objects = []
        for i in range(len(self)):
            codes = self.seg_codes[i]
            objects.append(
                {
                    "box": [round(float(v), 3) for v in self.xyxy[i]],
                    "label": self.class_name[i],
                    "class_id": int(self.class_id[i]),
                    "score": None if self.score is None else round(float(self.score[i]), 6),
                    "seg_codes": codes.tolist() if (codes >= 0).all() else None,
                }
            )
            if self.masks is not None:
                objects[-1]["mask"] = self.masks[i]
        return {
            "image_size": list(self.image_size),
            "detections": objects,
            "parse_issues": {k: v for k, v in self.parse_issues.items() if v},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Detections:
        objects = data.get("detections", [])
        scores = [obj.get("score") for obj in objects]
        scored = bool(objects) and all(s is not None for s in scores)
        return cls(
            xyxy=np.array([obj["box"] for obj in objects], np.float32).reshape(-1, 4),
            class_name=[obj["label"] for obj in objects],
            class_id=np.array([obj.get("class_id", -1) for obj in objects], np.int64),
            score=np.array(scores, np.float32) if scored else (None if objects else np.zeros(0)),
            seg_codes=np.array(
                [obj.get("seg_codes") or [-1] * SEG_TOKENS_PER_OBJECT for obj in objects], np.int16
            ),
            image_size=tuple(data["image_size"]),
            parse_issues=data.get("parse_issues", {}),
            masks=[obj.get("mask") for obj in objects] if any("mask" in obj for obj in objects) else None,
        )


def _to_bin(value: float) -> int:
    if not math.isfinite(value):
        raise ValueError(f"coordinate {value!r} is not finite")
    return min(LOC_BINS - 1, max(0, round(value * (LOC_BINS - 1))))


def encode(boxes_xyxy: Any, labels: Sequence[str], image_size: tuple[int, int], seg_codes: Any = None) -> str:
    """Write boxes (pixels, x1 y1 x2 y2) with their labels as a PaliGemma suffix.

    ``image_size`` is (width, height). Coordinates outside the image are clipped. No boxes
    gives the empty string (a negative image). ``seg_codes``: ``(N, 16)`` mask codes written
    after each box's location tokens (rows with a negative code: none), as ``segment``
    answers carry them.

    Example:
        >>> encode([[0, 0, 100, 50]], ["fracture"], (100, 100))
        '<loc0000><loc0000><loc0512><loc1023> fracture'
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    codes = (
        np.full((len(boxes), SEG_TOKENS_PER_OBJECT), -1)
        if seg_codes is None
        else np.asarray(seg_codes, dtype=np.int64).reshape(-1, SEG_TOKENS_PER_OBJECT)
    )
    if len(codes) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(codes)} rows of seg codes")
    objects = []
    for (x1, y1, x2, y2), label, row in zip(boxes, labels, codes):
        bins = [_to_bin(y1 / height), _to_bin(x1 / width), _to_bin(y2 / height), _to_bin(x2 / width)]
        segs = "".join(seg_token(int(c)) for c in row) if (row >= 0).all() else ""
        objects.append("".join(loc_token(b) for b in bins) + segs + f" {label.strip()}")
    return SEPARATOR.join(objects)


def classes_from_prefix(prefix: str) -> list[str]:
    """Class names of a ``detect``/``segment`` prompt: ``"detect a ; b"`` -> ``["a", "b"]``.

    Other prompts (``caption en``, ``answer en …``) have no classes: ``[]``.
    """
    words = prefix.strip().split(maxsplit=1)
    if len(words) < 2 or words[0] not in ("detect", "segment"):
        return []
    return [name.strip() for name in words[1].split(";") if name.strip()]


@dataclass
class _Span:
    start: int
    end: int


def _token_offsets(pieces: Sequence[str]) -> list[_Span]:
    spans, position = [], 0
    for piece in pieces:
        spans.append(_Span(position, position + len(piece)))
        position += len(piece)
    return spans


def parse(
    text: str,
    image_size: tuple[int, int],
    classes: Sequence[str] | None = None,
    token_logprobs: Sequence[tuple[str, float]] | None = None,
) -> Detections:
    """Read every object in PaliGemma output ``text``; never raises on any string.

    Args:
        text: decoded model output (text before the first and after the last object is
            ignored).
        image_size: (width, height) in pixels of the image the boxes refer to.
        classes: the class list; labels outside it are kept with class id -1 and counted
            as ``unknown_label``. Without it, class ids number the labels in order of
            first appearance.
        token_logprobs: the decoded tokens as ``(piece, logprob)`` pairs whose pieces
            concatenate to ``text``. An object's score is the geometric mean of the
            probabilities of the tokens that overlap its location tokens and label (its
            segmentation tokens excluded). Without it, ``score`` is None.

    Kept: objects followed by ``<segNNN>`` tokens (codes kept; fewer than 16 are counted
    as ``partial_seg`` and not kept), labels with punctuation or several words, repeated
    or trailing separators. Dropped and counted: fewer than four location tokens
    (``truncated``), a box with y2 < y1 or x2 < x1 (``inverted``), a box with no label
    (``empty_label``).
    """
    width, height = int(image_size[0]), int(image_size[1])
    issues = _empty_issues()
    boxes: list[list[float]] = []
    names: list[str] = []
    seg_rows: list[list[int]] = []
    spans: list[tuple[int, int, int, int]] = []  # object start/end, seg start/end

    tokens = list(_TOKEN.finditer(text))
    i = 0
    while i < len(tokens):
        if tokens[i].group(1) is None:  # a stray <seg> token outside any object
            i += 1
            continue
        # A run of location tokens, adjacent to each other.
        run = [tokens[i]]
        while (
            i + len(run) < len(tokens)
            and tokens[i + len(run)].group(1) is not None
            and tokens[i + len(run)].start() == run[-1].end()
            and len(run) < 4
        ):
            run.append(tokens[i + len(run)])
        i += len(run)
        if len(run) < 4:
            issues["truncated"] += 1
            continue
        object_start, cursor = run[0].start(), run[-1].end()
        # Segmentation codes directly after the box (whitespace tolerated).
        codes: list[int] = []
        seg_start = seg_end = cursor
        while (
            i < len(tokens)
            and tokens[i].group(2) is not None
            and not text[cursor : tokens[i].start()].strip()
        ):
            if not codes:
                seg_start = tokens[i].start()
            codes.append(int(tokens[i].group(2)))
            cursor = seg_end = tokens[i].end()
            i += 1
        label_end_match = _LABEL_END.search(text, cursor)
        label_end = label_end_match.start() if label_end_match else len(text)
        label = text[cursor:label_end].strip()
        if not label:
            at_end = label_end_match is None or not text[label_end:].strip(" ;\n")
            issues["truncated" if at_end else "empty_label"] += 1
            continue
        if codes and len(codes) != SEG_TOKENS_PER_OBJECT:
            issues["partial_seg"] += 1
            codes = []
        y1, x1, y2, x2 = (int(token.group(1)) / (LOC_BINS - 1) for token in run)
        if y2 < y1 or x2 < x1:
            issues["inverted"] += 1
            continue
        boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
        names.append(label)
        seg_rows.append(codes if codes else [-1] * SEG_TOKENS_PER_OBJECT)
        label_stop = cursor + len(text[cursor:label_end].rstrip())
        spans.append((object_start, label_stop, seg_start, seg_end))

    if classes is not None:
        lookup = {name: index for index, name in enumerate(classes)}
        class_ids = [lookup.get(name, -1) for name in names]
        issues["unknown_label"] = sum(1 for c in class_ids if c == -1)
    else:
        order: dict[str, int] = {}
        class_ids = [order.setdefault(name, len(order)) for name in names]

    scores = None
    if token_logprobs is not None:
        scores = _span_scores(text, token_logprobs, spans)

    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        class_name=names,
        class_id=np.array(class_ids, np.int64),
        score=scores,
        seg_codes=np.array(seg_rows, np.int16).reshape(-1, SEG_TOKENS_PER_OBJECT),
        image_size=(width, height),
        parse_issues=issues,
    )


def _span_scores(
    text: str, token_logprobs: Sequence[tuple[str, float]], spans: list[tuple[int, int, int, int]]
) -> np.ndarray:
    pieces = [piece for piece, _ in token_logprobs]
    if "".join(pieces) != text:
        raise ValueError("token_logprobs pieces do not concatenate to the parsed text")
    offsets = _token_offsets(pieces)
    logprobs = np.array([lp for _, lp in token_logprobs], np.float64)
    scores = []
    for start, end, seg_start, seg_end in spans:
        chosen = [
            k
            for k, span in enumerate(offsets)
            if span.start < end
            and span.end > start
            and span.end > span.start
            and not (seg_start <= span.start and span.end <= seg_end and seg_end > seg_start)
        ]
        mean = float(np.mean(logprobs[chosen])) if chosen else -math.inf
        scores.append(math.exp(mean) if math.isfinite(mean) else 0.0)
    return np.clip(np.array(scores, np.float32), 0.0, 1.0)
