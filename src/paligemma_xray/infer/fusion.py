"""Fusing boxes: a model's own near-duplicates, test-time augmentation and ensembles.

All fusion is ``ensemble-boxes``' (weighted box fusion, non-maximum suppression), on boxes
normalised to the image. :class:`FusedDetector` wraps one or several
:class:`~paligemma_xray.infer.Detector`\\ s and looks like one to ``evaluate`` and
``predict``: each model sees each image (and, with ``tta=("hflip",)``, its mirror image,
whose boxes are mirrored back), and the per-image answers are fused with WBF. A box that
only some of the answers contain keeps a proportionally lower score (WBF's "avg"
confidence), so agreement raises a box's rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer.calibrated import Calibration
from paligemma_xray.infer.detector import Detector, DetectorLike, Generation
from paligemma_xray.infer.masks import MaskDecoder
from paligemma_xray.infer.settings import (
    DEFAULT_DETECT_TOKENS,
    FUSION_METHODS,
    TTA_TRANSFORMS,
    check_decoding,
)
from paligemma_xray.locations import DEFAULT_PROMPT, SEG_TOKENS_PER_OBJECT, Detections, classes_from_prefix

FUSION_IOU = 0.55  # ensemble-boxes' default for WBF
"""IoU at which boxes of different answers are taken to be the same finding."""
MERGE_IOU = 0.7
"""IoU at which two boxes of one answer are near-duplicates (evaluate.metrics.DUPLICATE_IOU)."""


def hflip(detections: Detections) -> Detections:
    """Boxes found on the mirrored image, mirrored back onto the original (x → width − x)."""
    width = float(detections.image_size[0])
    xyxy = detections.xyxy.copy()
    xyxy[:, [0, 2]] = width - detections.xyxy[:, [2, 0]]
    return replace(detections, xyxy=xyxy, parse_issues=dict(detections.parse_issues))


def fuse(
    answers: Sequence[Detections],
    *,
    method: str = "wbf",
    iou_threshold: float = FUSION_IOU,
    weights: Sequence[float] | None = None,
) -> Detections:
    """Fuse several answers for ONE image into one (``method``: ``"wbf"`` or ``"nms"``).

    With a single answer this merges its own near-duplicates. Labels are fused by name;
    ``class_id`` is kept per name; segmentation codes do not survive fusion (-1 rows).
    ``parse_issues`` are summed over the answers (each decode's dropped objects count).
    """
    from ensemble_boxes import nms, weighted_boxes_fusion

    if method not in FUSION_METHODS:
        raise ConfigError(f"fusion method {method!r}: choose one of {', '.join(FUSION_METHODS)}")
    if not answers:
        raise ValueError("nothing to fuse")
    size = answers[0].image_size
    width, height = float(size[0]), float(size[1])
    names: list[str] = []
    ids: dict[str, int] = {}
    boxes, scores, labels = [], [], []
    issues: dict[str, int] = {}
    for answer in answers:
        if answer.image_size != size:
            raise ValueError("answers to fuse must describe the same image")
        for kind, count in answer.parse_issues.items():
            issues[kind] = issues.get(kind, 0) + int(count)
        for name, class_id in zip(answer.class_name, answer.class_id):
            if name not in ids:
                ids[name] = int(class_id)
                names.append(name)
        scale = np.array([width, height, width, height], dtype=np.float64)
        boxes.append(np.clip(answer.xyxy.astype(np.float64) / scale, 0.0, 1.0).tolist())
        scored = answer.score if answer.score is not None else np.ones(len(answer))
        scores.append(np.asarray(scored, dtype=np.float64).tolist())
        labels.append([names.index(n) for n in answer.class_name])
    if not any(boxes):
        empty = Detections.empty(size)
        empty.parse_issues = {**empty.parse_issues, **issues}
        return empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-area boxes are skipped with a warning each
        if method == "wbf":
            fused, fused_scores, fused_labels = weighted_boxes_fusion(
                boxes,
                scores,
                labels,
                weights=None if weights is None else list(weights),
                iou_thr=iou_threshold,
            )
        else:
            fused, fused_scores, fused_labels = nms(
                boxes,
                scores,
                labels,
                iou_thr=iou_threshold,
                weights=None if weights is None else list(weights),
            )
    fused = np.asarray(fused, dtype=np.float64).reshape(-1, 4) * np.array([width, height, width, height])
    fused_names = [names[int(k)] for k in fused_labels]
    n = len(fused_names)
    return Detections(
        xyxy=fused,
        class_name=fused_names,
        class_id=np.array([ids[name] for name in fused_names], dtype=np.int64),
        score=np.clip(np.asarray(fused_scores, dtype=np.float64), 1e-9, 1.0),
        seg_codes=-np.ones((n, SEG_TOKENS_PER_OBJECT), np.int16),
        image_size=size,
        parse_issues=issues,
    )


def merge_duplicates(
    detections: Detections, method: str = "nms", iou_threshold: float = MERGE_IOU
) -> Detections:
    """One answer with its near-duplicate boxes merged (NMS keeps the best, WBF averages)."""
    return fuse([detections], method=method, iou_threshold=iou_threshold)


class FusedDetector:
    """Several detectors and/or test-time augmentation, fused per image; used like a Detector.

    Args:
        detectors: one or more loaded detectors (each sees every image).
        tta: transforms added to the plain view; ``("hflip",)`` mirrors the image.
        method: how the answers of one image are fused (``"wbf"`` or ``"nms"``).
        iou_threshold: IoU at which boxes of different answers are one finding.
        merge: merge each answer's own near-duplicates first (``"nms"``/``"wbf"``; None: no).
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        *,
        tta: Sequence[str] = (),
        method: str = "wbf",
        iou_threshold: float = FUSION_IOU,
        merge: str | None = None,
    ) -> None:
        if not detectors:
            raise ConfigError("fusion needs at least one model")
        unknown = [t for t in tta if t not in TTA_TRANSFORMS]
        if unknown:
            raise ConfigError(
                f"test-time augmentation {unknown[0]!r}: choose from {', '.join(TTA_TRANSFORMS)}"
            )
        if method not in FUSION_METHODS:
            raise ConfigError(f"fusion method {method!r}: choose one of {', '.join(FUSION_METHODS)}")
        if merge is not None and merge not in FUSION_METHODS:
            raise ConfigError(f"duplicate merging {merge!r}: choose one of {', '.join(FUSION_METHODS)}")
        if not 0 < iou_threshold <= 1:
            raise ConfigError(f"fusion IoU must be in (0, 1], got {iou_threshold}")
        self.detectors = list(detectors)
        self.tta = tuple(tta)
        self.method = method
        self.iou_threshold = iou_threshold
        self.merge = merge
        first = self.detectors[0]
        self.box_or_stop = first.box_or_stop
        self.min_box_probability = first.min_box_probability
        self.batch_size = first.batch_size
        self.calibration: Calibration | None = (
            None  # a fused model's scores are not those any saved calibration saw
        )
        self.mask_decoder: MaskDecoder | None = None  # fusion merges boxes; masks are not fused
        views = " + ".join(d.model_id for d in self.detectors)
        extras = [f"tta {'+'.join(self.tta)}"] * bool(self.tta) + [f"merge {merge}"] * bool(merge)
        fused = f" ({method})" if len(self.detectors) > 1 or self.tta else ""
        self.model_id = views + fused + (f" [{', '.join(extras)}]" if extras else "")
        #: the weights' dtype (``+``-joined when the models differ), as the outputs record it
        self.dtype = "+".join(dict.fromkeys(d.dtype for d in self.detectors))

    def _views(self, chunk: list[Image.Image]) -> list[tuple[Detector, list[Image.Image], bool]]:
        views = []
        for detector in self.detectors:
            views.append((detector, chunk, False))
            if "hflip" in self.tta:
                views.append((detector, [ImageOps.mirror(image) for image in chunk], True))
        return views

    def detect(
        self,
        images: Sequence[Any],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> list[Detections]:
        """Fused detections per image (see :meth:`Detector.detect`)."""
        return [d for _, d in self.iter_detect(images, prompt, max_new_tokens, batch_size, threshold)]

    def iter_detect(
        self,
        images: Iterable[Any],
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_DETECT_TOKENS,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> Iterator[tuple[Generation, Detections]]:
        """``(generation, fused detections)`` per image, one batch of images in memory.

        The generation is the first model's plain answer, ``finished`` only when every
        answer of the image finished (a runaway answer in any view shows).
        """
        check_decoding(batch_size=batch_size, max_new_tokens=max_new_tokens, threshold=threshold)
        size = batch_size or self.batch_size
        first = self.detectors[0]
        index = 0
        for chunk in first._batches(images, size):
            prompts = (
                [prompt] * len(chunk) if isinstance(prompt, str) else list(prompt[index : index + len(chunk)])
            )
            index += len(chunk)
            per_view: list[list[tuple[Generation, Detections]]] = []
            for detector, view, mirrored in self._views(chunk):
                results = list(detector.iter_detect(view, prompts, max_new_tokens, len(chunk)))
                per_view.append([(g, hflip(d) if mirrored else d) for g, d in results])
            for i in range(len(chunk)):
                answers = [view[i][1] for view in per_view]
                if self.merge is not None:
                    answers = [merge_duplicates(a, self.merge) for a in answers]
                found = (
                    fuse(answers, method=self.method, iou_threshold=self.iou_threshold)
                    if len(answers) > 1
                    else answers[0]
                )
                classes = classes_from_prefix(prompts[i])
                if classes:  # ids against the prompt's own class list, as parse gives them
                    found.class_id = np.array(
                        [classes.index(n) if n in classes else -1 for n in found.class_name]
                    )
                if threshold is not None:
                    found = found.with_threshold(threshold)
                generation = per_view[0][i][0]
                finished = all(view[i][0].finished for view in per_view)
                yield replace(generation, finished=finished), found

    def iter_generate(self, *args: Any, **kwargs: Any) -> Iterator[Generation]:
        raise ConfigError("several models or test-time augmentation only apply to detect/segment prompts")


if TYPE_CHECKING:  # mypy holds both kinds of detector to the one protocol their users rely on
    _PLAIN: type[DetectorLike] = Detector
    _FUSED: type[DetectorLike] = FusedDetector
