"""Detection metrics as a radiologist's detector is judged: mAP, FROC, image-level.

mAP (COCO-exact) comes from faster-coco-eval, never from a home-made AP. The threshold
metrics (precision / recall / F1, FROC, image level) need a per-box true/false-positive
decision; :func:`match` makes it the COCO way (per image and class, predictions in
descending score order, each ground-truth box matched at most once, IoU ≥ 0.5), so the
numbers at a threshold agree with the curve mAP is computed from.

Everything returned is plain JSON (floats, ints, lists, dicts; ``None`` where a figure is
undefined, e.g. specificity on a set with no negative image).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from paligemma_xray.errors import ConfigError
from paligemma_xray.locations import Detections

#: False positives per image at which FROC sensitivity is reported (the CAMELYON / LUNA set).
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: IoU thresholds of the medical mAP (nnDetection's ``mAP_IoU_0.10_0.50_0.05``): lesions are
#: small and their borders uncertain, so a hit is judged leniently (LUNA16 matches at 0.1).
MEDICAL_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)

#: IoU at or above which a box repeats an earlier box of the same label in one answer (the
#: "runaway" outputs that repeat boxes until the token limit).
DUPLICATE_IOU = 0.7


@dataclass
class Matching:
    """The true/false-positive decision for every box of one image.

    ``pred_tp[i]`` is True when prediction ``i`` matched a ground-truth box of its class
    (IoU ≥ the threshold) not already taken by a higher-scored prediction;
    ``gt_matched_by[j]`` is the index of the prediction that took ground-truth box ``j``
    (-1 when none did), so a box missed at a threshold ``t`` is one whose matcher scored
    below ``t`` or is -1.
    """

    pred_tp: np.ndarray  # (P,) bool
    pred_iou: np.ndarray  # (P,) best IoU with any ground truth of the same class
    gt_matched_by: np.ndarray  # (G,) int, -1 = never matched


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N, 4) and (M, 4) xyxy boxes, COCO's way (no +1 on pixel sizes)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _scores(dets: Detections) -> np.ndarray:
    # A prediction set without scores (e.g. another tool's output) ranks all boxes equally.
    if dets.score is None:
        return np.ones(len(dets), dtype=np.float64)
    return np.asarray(dets.score, dtype=np.float64)


def _class_index(names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    # Matched by name, not by the stored class_id: predictions may have been parsed against
    # another class list than the one evaluated here. -1: not an evaluated class.
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup.get(name, -1) for name in names], dtype=np.int64)


def match(
    ground_truth: Detections, prediction: Detections, classes: Sequence[str], iou_threshold: float = 0.5
) -> Matching:
    """Match one image's predictions to its ground truth (COCO's greedy rule).

    Predictions whose label is not in ``classes`` never match: they are false positives.

    >>> import numpy as np
    >>> from paligemma_xray.locations import Detections
    >>> gt = Detections.empty((100, 100))
    >>> match(gt, gt, ["fracture"]).pred_tp.tolist()
    []
    """
    gt_cls = _class_index(ground_truth.class_name, classes)
    pr_cls = _class_index(prediction.class_name, classes)
    scores = _scores(prediction)
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(prediction.xyxy, ground_truth.xyxy)
    pred_tp = np.zeros(len(prediction), dtype=bool)
    pred_iou = np.zeros(len(prediction), dtype=np.float64)
    gt_by = np.full(len(ground_truth), -1, dtype=np.int64)
    for i in order:
        if pr_cls[i] < 0 or len(ground_truth) == 0:
            continue
        same = gt_cls == pr_cls[i]
        candidates = np.where(same, iou[i], -1.0)
        pred_iou[i] = max(candidates.max(), 0.0)
        candidates = np.where(gt_by < 0, candidates, -1.0)
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            pred_tp[i] = True
            gt_by[j] = i
    return Matching(pred_tp=pred_tp, pred_iou=pred_iou, gt_matched_by=gt_by)


# ---------------------------------------------------------------------------------------------
# COCO mAP through faster-coco-eval


def coco_dicts(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    image_order: Sequence[int] | NDArray[np.integer],
) -> tuple[dict, list[dict]]:
    """COCO ground-truth dict and results list; image ``k`` of the result is ``image_order[k]``.

    Image ids are positions in ``image_order`` (1-based), so a bootstrap sample that draws
    the same image twice gets two distinct COCO images.
    """
    images: list[dict] = []
    annotations: list[dict] = []
    results: list[dict] = []
    for k, index in enumerate(image_order, start=1):
        gt, pr = ground_truth[index], predictions[index]
        width, height = gt.image_size
        images.append({"id": k, "width": int(width), "height": int(height)})
        for box, cls in zip(gt.xyxy, _class_index(gt.class_name, classes)):
            if cls < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for box, cls, score in zip(pr.xyxy, _class_index(pr.class_name, classes), _scores(pr)):
            if cls < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": k,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def coco_precision(
    gt_dict: dict,
    results: list[dict],
    *,
    all_areas_only: bool = False,
    iou_thresholds: Sequence[float] | NDArray[np.floating] | None = None,
) -> np.ndarray:
    """COCO's accumulated precision array ``[T=10, R=101, K, A, M]`` from faster-coco-eval.

    ``all_areas_only`` evaluates the 'all' area range alone (what the bootstrap needs: the
    same numbers for that range at a quarter of the cost). ``iou_thresholds`` replaces
    COCO's 0.5:0.95 (e.g. :data:`MEDICAL_IOU_THRESHOLDS`); ``T`` is then their number.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    # The library logs every step; results stay quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_dict)
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        if all_areas_only:
            evaluator.params.areaRng = [evaluator.params.areaRng[0]]
            evaluator.params.areaRngLbl = ["all"]
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
    return np.asarray(evaluator.eval["precision"])


def _object_masks(dets: Detections) -> list:
    """Each object's RLE; an object without a mask counts with its box filled (documented)."""
    from paligemma_xray.masks import encode_rle

    width, height = dets.image_size
    out = []
    for i in range(len(dets)):
        rle = dets.masks[i] if dets.masks is not None else None
        if rle is None:
            filled = np.zeros((height, width), dtype=bool)
            x1, y1, x2, y2 = (int(float(v)) for v in dets.xyxy[i])
            filled[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
            rle = encode_rle(filled)
        out.append(rle)
    return out


def mask_metrics(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    *,
    iou_threshold: float = 0.5,
    threshold: float | None = None,
) -> dict | None:
    """Segmentation figures when both sides carry masks (``Detections.masks``); else None.

    ``map50`` / ``map50_95`` / ``ap_per_class``: COCO's ``segm`` evaluation (faster-coco-eval,
    the same library and image/category numbering as the boxes); objects without a mask count
    with their box filled (``objects_without_mask`` says how many). ``dice`` / ``iou``: per
    predicted object matched to a ground-truth object by its box (COCO's greedy rule at
    ``iou_threshold``, scored ≥ ``threshold``), the Dice coefficient and IoU of the two masks:
    ``mean``, ``median``, ``n`` (matched pairs where both have a mask).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    from paligemma_xray.masks import decode_rle, dice, mask_iou, rle_area

    if not any(g.has_masks for g in ground_truth) or not any(p.has_masks for p in predictions):
        return None
    classes = list(classes)
    gt_dict, results = coco_dicts(ground_truth, predictions, classes, np.arange(len(ground_truth)))
    without = 0
    annotations = iter(gt_dict["annotations"])
    results_iter = iter(results)
    for gt, pr in zip(ground_truth, predictions):
        for rle, cls, given in zip(
            _object_masks(gt), _class_index(gt.class_name, classes), gt.masks or [None] * len(gt)
        ):
            if cls >= 0:
                next(annotations)["segmentation"] = rle
                without += given is None
        for rle, cls, given in zip(
            _object_masks(pr), _class_index(pr.class_name, classes), pr.masks or [None] * len(pr)
        ):
            if cls >= 0:
                result = next(results_iter)
                result["segmentation"] = rle
                del result["bbox"]  # loadRes then reads the masks (area, box) from the RLE
                without += given is None
    for annotation in gt_dict["annotations"]:
        annotation["area"] = float(rle_area(annotation["segmentation"]))
    if gt_dict["images"]:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt_dict)
            coco_dt = coco_gt.loadRes(results) if results else COCO()
            evaluator = COCOeval_faster(coco_gt, coco_dt, "segm", print_function=lambda *a, **k: None)
            evaluator.evaluate()
            evaluator.accumulate()
        summary = _coco_summary(np.asarray(evaluator.eval["precision"]), classes)
    else:
        summary = {"map50": None, "map50_95": None, "ap_per_class": {}}
    dices: list[float] = []
    ious: list[float] = []
    for gt, pr in zip(ground_truth, predictions):
        if not (gt.has_masks and pr.has_masks) or gt.masks is None or pr.masks is None:
            continue
        matching = match(gt, pr, classes, iou_threshold)
        scores = _scores(pr)
        for j, i in enumerate(matching.gt_matched_by):
            if i < 0 or (threshold is not None and scores[i] < threshold):
                continue
            a, b = gt.masks[j], pr.masks[i]
            if a is None or b is None:
                continue
            truth_mask, predicted_mask = decode_rle(a), decode_rle(b)
            dices.append(dice(predicted_mask, truth_mask))
            ious.append(mask_iou(predicted_mask, truth_mask))

    def figures(values: list[float]) -> dict:
        return {
            "mean": float(np.mean(values)) if values else None,
            "median": float(np.median(values)) if values else None,
            "n": len(values),
        }

    return {
        **summary,
        "dice": figures(dices),
        "iou": figures(ious),
        "iou_threshold": iou_threshold,
        "objects_without_mask": without,
    }


@functools.cache
def _both_iou_thresholds() -> np.ndarray:
    """The medical thresholds below 0.5, then COCO's own array (0.5 … 0.95, as it builds it)."""
    from faster_coco_eval.core.cocoeval import Params

    coco = np.asarray(Params(iouType="bbox").iouThrs, dtype=np.float64)
    return np.concatenate([np.asarray(MEDICAL_IOU_THRESHOLDS[:-1]), coco])


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _coco_summary(precision: np.ndarray, classes: Sequence[str]) -> dict:
    # Area 'all' (index 0), 100 detections (last): what COCO's summarize() reports as AP / AP50.
    p = precision[:, :, :, 0, -1]
    return {
        "map50_95": _mean_valid(p),
        "map50": _mean_valid(p[0]),
        "ap_per_class": {
            name: {"ap50": _mean_valid(p[0, :, k]), "ap50_95": _mean_valid(p[:, :, k])}
            for k, name in enumerate(classes)
        },
    }


# ---------------------------------------------------------------------------------------------
# threshold metrics, FROC, image level


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None or precision + recall == 0:
        return None if precision is None or recall is None else 0.0
    return 2 * precision * recall / (precision + recall)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


@dataclass
class FlatPredictions:
    """All predictions of the set flattened, with what bootstrap resampling needs.

    Built by :func:`flatten_predictions`; shared with calibration and the paired comparison.
    """

    score: np.ndarray  # (P,)
    tp: np.ndarray  # (P,) bool
    image: np.ndarray  # (P,) image index of each prediction
    gt_per_image: np.ndarray  # (I,) evaluated ground-truth boxes per image
    max_score: np.ndarray  # (I,) highest prediction score per image (0 if none)
    positive: np.ndarray  # (I,) image has at least one ground-truth box


def flatten_predictions(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    iou_threshold: float,
) -> tuple[FlatPredictions, list[Matching]]:
    """Every prediction of the set matched at ``iou_threshold``, flattened; and each image's matching."""
    scores, tps, images, matchings = [], [], [], []
    gt_count = np.zeros(len(ground_truth), dtype=np.int64)
    max_score = np.zeros(len(ground_truth))
    for i, (gt, pr) in enumerate(zip(ground_truth, predictions)):
        m = match(gt, pr, classes, iou_threshold)
        matchings.append(m)
        s = _scores(pr)
        scores.append(s)
        tps.append(m.pred_tp)
        images.append(np.full(len(pr), i))
        gt_count[i] = int((_class_index(gt.class_name, classes) >= 0).sum())
        max_score[i] = s.max() if len(s) else 0.0
    flat = FlatPredictions(
        score=np.concatenate(scores) if scores else np.zeros(0),
        tp=np.concatenate(tps) if tps else np.zeros(0, dtype=bool),
        image=np.concatenate(images).astype(np.int64) if images else np.zeros(0, dtype=np.int64),
        gt_per_image=gt_count,
        max_score=max_score,
        positive=gt_count > 0,
    )
    return flat, matchings


def threshold_metrics(score: np.ndarray, tp: np.ndarray, n_gt: int, threshold: float) -> dict:
    """Box-level precision, recall, F1 and counts of predictions ``score`` (true positive: ``tp``)."""
    keep = score >= threshold
    n_tp = int(tp[keep].sum())
    n_fp = int(keep.sum()) - n_tp
    n_fn = int(n_gt) - n_tp
    precision = _ratio(n_tp, n_tp + n_fp)
    recall = _ratio(n_tp, n_gt)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "tp": n_tp,
        "fp": n_fp,
        "fn": n_fn,
    }


def best_f1_threshold(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    iou_threshold: float = 0.5,
) -> float | None:
    """The score threshold with the highest box-level F1 on this set (None: no true positive).

    Choose an operating point on a validation split and report the test split at it: a
    model's scores need not be calibrated, so a fixed 0.5 can sit above every box it emits.
    The threshold returned is a score of one of the predictions (the lowest one kept).

    One fracture; a right box scored 0.2 and a wrong one scored 0.1: keep only the first.

    >>> import numpy as np
    >>> from paligemma_xray.locations import parse
    >>> truth = parse("<loc0000><loc0000><loc0100><loc0100> fracture", (1024, 1024))
    >>> found = parse("<loc0000><loc0000><loc0100><loc0100> fracture ; "
    ...               "<loc0500><loc0500><loc0600><loc0600> fracture", (1024, 1024))
    >>> found.score = np.array([0.2, 0.1], np.float32)
    >>> round(best_f1_threshold([truth], [found], ["fracture"]), 3)
    0.2
    """
    flat, _ = flatten_predictions(ground_truth, predictions, classes, iou_threshold)
    return best_f1_threshold_of(flat)


def best_f1_threshold_of(flat: FlatPredictions) -> float | None:
    """:func:`best_f1_threshold` of predictions already flattened."""
    n_gt = int(flat.gt_per_image.sum())
    if not flat.tp.any() or n_gt == 0:
        return None
    order = np.argsort(-flat.score, kind="stable")
    score, tp = flat.score[order], flat.tp[order]
    # Only the last of equal scores is a threshold one can set.
    last_of_tie = np.append(score[1:] != score[:-1], True)
    cum_tp = np.cumsum(tp)
    kept = np.arange(1, len(score) + 1)
    f1 = 2 * cum_tp / (kept + n_gt)
    f1 = np.where(last_of_tie, f1, -1.0)
    return float(score[int(np.argmax(f1))])


def _froc_curve(score, tp, n_gt, n_images) -> tuple[np.ndarray, np.ndarray]:
    """(false positives per image, sensitivity) at every distinct score, highest first."""
    if len(score) == 0 or n_images == 0:
        return np.zeros(1), np.zeros(1)
    order = np.argsort(-score, kind="stable")
    s, t = score[order], tp[order]
    cum_tp, cum_fp = np.cumsum(t), np.cumsum(~t)
    # Only the last prediction of a run of equal scores is a reachable operating point.
    last = np.r_[s[1:] != s[:-1], True]
    fppi = np.r_[0.0, cum_fp[last] / n_images]
    sens = np.r_[0.0, cum_tp[last] / n_gt if n_gt else np.zeros(last.sum())]
    return fppi, sens


def _froc_at(fppi, sens, rates=FROC_FP_RATES) -> list[float]:
    # The curve linearly interpolated at each rate, as LUNA16's CPM, CAMELYON16 and
    # nnDetection compute it; flat past its last point (no prediction left to lower the
    # threshold to). Where several points share a false-positive rate, np.interp takes the
    # last (highest sensitivity) one, the corner the curve reaches there.
    return [float(v) for v in np.interp(rates, fppi, sens)]


def _auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney), ties counted half."""
    if len(scores_pos) == 0 or len(scores_neg) == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([scores_pos, scores_neg]))  # ties get their average rank
    r_pos = ranks[: len(scores_pos)].sum()
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def image_level_metrics(max_score: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    """Image-level sensitivity, specificity, counts and AUC, an image called by its highest score."""
    called = max_score >= threshold
    # An image without any prediction has max_score 0: never "called", whatever the threshold.
    called &= max_score > 0
    tp = int((called & positive).sum())
    fn = int((~called & positive).sum())
    tn = int((~called & ~positive).sum())
    fp = int((called & ~positive).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "auc": _auc(max_score[positive], max_score[~positive]),
    }


def duplicate_boxes(prediction: Detections, iou_threshold: float = DUPLICATE_IOU) -> np.ndarray:
    """``(N,)`` bool: box ``i`` repeats an earlier box of the same label (IoU ≥ ``iou_threshold``).

    "Earlier" is the order the model wrote them in; the first of a group is not counted.

    >>> from paligemma_xray.locations import parse
    >>> found = parse("<loc0000><loc0000><loc0100><loc0100> fracture ; "
    ...               "<loc0001><loc0000><loc0100><loc0100> fracture", (1024, 1024))
    >>> duplicate_boxes(found).tolist()
    [False, True]
    """
    iou = box_iou(prediction.xyxy, prediction.xyxy)
    same = np.equal.outer(
        np.array(prediction.class_name, dtype=object), np.array(prediction.class_name, dtype=object)
    )
    earlier = np.tril(np.ones_like(iou, dtype=bool), k=-1)  # [i, j]: j written before i
    return ((iou >= iou_threshold) & same & earlier).any(axis=1) if len(prediction) else np.zeros(0, bool)


def _duplicates(predictions: Sequence[Detections], iou_threshold: float) -> dict:
    per_image = [int(duplicate_boxes(p, iou_threshold).sum()) for p in predictions]
    return {
        "boxes": sum(per_image),
        "images": sum(1 for n in per_image if n),
        "iou": iou_threshold,
    }


def _pointwise(flat: FlatPredictions, images: np.ndarray, threshold: float) -> dict[str, float | None]:
    """The non-COCO figures on a (re)sample of images, for the bootstrap."""
    counts = np.bincount(images, minlength=len(flat.gt_per_image))
    weight = counts[flat.image]  # a prediction counts once per draw of its image
    score = np.repeat(flat.score, weight)
    tp = np.repeat(flat.tp, weight)
    n_gt = int((flat.gt_per_image * counts).sum())
    at = threshold_metrics(score, tp, n_gt, threshold)
    fppi, sens = _froc_curve(score, tp, n_gt, len(images))
    froc = _froc_at(fppi, sens)
    img = image_level_metrics(flat.max_score[images], flat.positive[images], threshold)
    return {
        "precision": at["precision"],
        "recall": at["recall"],
        "f1": at["f1"],
        "froc_score": float(np.mean(froc)) if n_gt else None,
        **{froc_key(rate): (value if n_gt else None) for rate, value in zip(FROC_FP_RATES, froc)},
        "image_sensitivity": img["sensitivity"],
        "image_specificity": img["specificity"],
        "image_auc": img["auc"],
    }


def sample_figures(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    flat: FlatPredictions,
    draw: np.ndarray,
    threshold: float,
) -> dict[str, float | None]:
    """Every bootstrapped figure on the images ``draw`` (indices, repeats allowed).

    Shared by the intervals here and the paired comparison of two models
    (:mod:`paligemma_xray.evaluate.compare`), which draws the same images for both.
    """
    point = _pointwise(flat, draw, threshold)
    gt_dict, results = coco_dicts(ground_truth, predictions, classes, draw)
    # One evaluation at both sets of IoU thresholds (each threshold is accumulated on its
    # own, so the figures are those of two separate runs): 0.1 … 0.45, then COCO's 0.5 … 0.95.
    medical = len(MEDICAL_IOU_THRESHOLDS) - 1
    p = coco_precision(gt_dict, results, all_areas_only=True, iou_thresholds=_both_iou_thresholds())
    p = p[:, :, :, 0, -1]
    point["map50"], point["map50_95"] = _mean_valid(p[medical]), _mean_valid(p[medical:])
    point["map10_50"] = _mean_valid(p[: medical + 1])
    return point


def froc_key(rate: float) -> str:
    """Key of the FROC sensitivity at ``rate`` false positives per image in ``ci95``."""
    return f"froc_at_{rate:g}"


def percentile_interval(samples: list[float | None]) -> list[float] | None:
    """The 95% percentile interval of bootstrap ``samples`` (None and NaN left out; None if < 2)."""
    values = np.array([v for v in samples if v is not None and not math.isnan(v)], dtype=np.float64)
    if values.size < 2:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def check_options(*, threshold: float | None = None, iou_threshold: float = 0.5, bootstrap: int = 0) -> None:
    """Raise :class:`ConfigError` on settings :func:`evaluate_detections` cannot use."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"threshold is a score between 0 and 1, got {threshold}")
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap is a number of resamples (0: none), got {bootstrap}")


def evaluate_detections(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    *,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
    curves: bool = True,
    duplicate_iou: float = DUPLICATE_IOU,
) -> dict:
    """Every figure of a detection evaluation, as a JSON-ready dict.

    ``ground_truth[i]`` and ``predictions[i]`` describe the same image. Boxes whose label is
    not in ``classes`` are left out of mAP and count as false positives elsewhere.

    Keys: ``map50``, ``map50_95``, ``ap_per_class`` (COCO-exact, faster-coco-eval);
    ``map10_50`` (the same COCO computation over :data:`MEDICAL_IOU_THRESHOLDS`,
    nnDetection's ``mAP_IoU_0.10_0.50_0.05``); ``precision`` / ``recall`` / ``f1`` / ``tp`` /
    ``fp`` / ``fn`` for boxes scored ≥ ``threshold`` and matched at ``iou_threshold`` (0.1
    is the usual medical criterion); ``threshold_source``: ``"given"``, or, when
    ``threshold`` is None, ``"best_f1_here"`` (the best-F1 threshold of this very set: an
    optimistic figure; choose an operating point on a validation split instead);
    ``best_f1_threshold`` (see :func:`best_f1_threshold`); ``froc`` (sensitivity at
    :data:`FROC_FP_RATES` false positives per image and their mean, ``froc.score``, the
    CPM score); ``image_level`` (any box ≥ threshold vs any fracture: sensitivity,
    specificity, confusion counts, ROC AUC of the highest box score); ``duplicates``
    (boxes repeating an earlier box of the same answer, see :func:`duplicate_boxes`);
    ``parse_failures`` (summed ``parse_issues``); ``ci95`` (percentile bootstrap over
    images, ``bootstrap`` resamples, seeded by ``seed``; 0 turns it off, e.g. during
    training); ``curves`` (COCO's interpolated precision-recall at IoU 0.5 per class and
    the FROC curve, for plots); ``masks`` (only when ground truth and predictions carry
    masks: :func:`mask_metrics`).

    >>> import numpy as np
    >>> from paligemma_xray.locations import Detections
    >>> gt = Detections.empty((100, 100))
    >>> evaluate_detections([gt], [gt], ["fracture"], bootstrap=0)["n_images"]
    1
    """
    check_options(threshold=threshold, iou_threshold=iou_threshold, bootstrap=bootstrap)
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} predictions")
    classes = list(classes)
    n_images = len(ground_truth)
    flat, _ = flatten_predictions(ground_truth, predictions, classes, iou_threshold)
    n_gt = int(flat.gt_per_image.sum())
    best_f1 = best_f1_threshold_of(flat)
    threshold_source = "given"
    if threshold is None:
        # No operating point given: the best F1 of this set (labelled as such), never a fixed
        # 0.5 that may sit above every score the model gives. No true positive: every box.
        threshold, threshold_source = (best_f1, "best_f1_here") if best_f1 is not None else (0.0, "all_boxes")

    everything = np.arange(n_images)
    if n_images:
        gt_dict, results = coco_dicts(ground_truth, predictions, classes, everything)
        precision = coco_precision(gt_dict, results)
        coco = _coco_summary(precision, classes)
        medical = coco_precision(gt_dict, results, all_areas_only=True, iou_thresholds=MEDICAL_IOU_THRESHOLDS)
        coco["map10_50"] = _mean_valid(medical[:, :, :, 0, -1])
        for k, name in enumerate(classes):
            coco["ap_per_class"][name]["ap10_50"] = _mean_valid(medical[:, :, k, 0, -1])
    else:
        precision = None
        coco = {"map50": None, "map50_95": None, "map10_50": None, "ap_per_class": {}}

    at = threshold_metrics(flat.score, flat.tp, n_gt, threshold)
    fppi, sens = _froc_curve(flat.score, flat.tp, n_gt, n_images)
    froc_values = _froc_at(fppi, sens)
    issues: dict[str, int] = {}
    for pr in predictions:
        for kind, count in (pr.parse_issues or {}).items():
            issues[kind] = issues.get(kind, 0) + int(count)

    result: dict = {
        "n_images": n_images,
        "n_positive_images": int(flat.positive.sum()),
        "n_ground_truth": n_gt,
        "n_predictions": len(flat.score),
        "classes": classes,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "iou_threshold": iou_threshold,
        "scores_missing": any(p.score is None for p in predictions if len(p)),
        **coco,
        **at,
        "froc": {
            "fp_per_image": list(FROC_FP_RATES),
            "sensitivity": froc_values,
            "score": float(np.mean(froc_values)) if n_gt else None,
        },
        "best_f1_threshold": best_f1,
        "image_level": image_level_metrics(flat.max_score, flat.positive, threshold),
        "duplicates": _duplicates(predictions, duplicate_iou),
        "parse_failures": {"total": sum(issues.values()), **issues},
    }
    masks = mask_metrics(ground_truth, predictions, classes, iou_threshold=iou_threshold, threshold=threshold)
    if masks is not None:
        result["masks"] = masks

    if bootstrap and n_images > 1:
        rng = np.random.default_rng(seed)
        samples: dict[str, list] = {}
        for _ in range(bootstrap):
            draw = rng.integers(0, n_images, n_images)
            point = sample_figures(ground_truth, predictions, classes, flat, draw, threshold)
            for key, value in point.items():
                samples.setdefault(key, []).append(value)
        result["ci95"] = {key: percentile_interval(values) for key, values in samples.items()}
        result["bootstrap"] = {"samples": bootstrap, "seed": seed, "unit": "image"}
    else:
        result["ci95"] = {}
        result["bootstrap"] = {"samples": 0, "seed": seed, "unit": "image"}

    if curves:
        recall_points = np.linspace(0, 1, 101)
        pr_curves = {}
        if precision is not None:
            for k, name in enumerate(classes):
                values = precision[0, :, k, 0, -1]
                if (values > -1).any():
                    pr_curves[name] = {
                        "recall": recall_points.round(4).tolist(),
                        "precision": np.clip(values, 0, 1).round(6).tolist(),
                    }
        result["curves"] = {
            "pr": pr_curves,
            "froc": {"fp_per_image": fppi.round(6).tolist(), "sensitivity": sens.round(6).tolist()},
        }
    return result
