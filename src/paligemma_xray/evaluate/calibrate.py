"""Fitting a calibration on a validation split, choosing an operating point, judging both.

:func:`fit_calibration` turns one split's ground truth and predictions into a
:class:`~paligemma_xray.infer.calibrated.Calibration`: the box map learns P(true positive
at the IoU) from box scores (the true/false-positive decision of
:func:`~paligemma_xray.evaluate.metrics.match`), the image map P(any fracture) from each
image's highest box score, and the operating point is chosen on the same split
(:func:`choose_threshold`). :func:`calibration_report` then measures, on another split,
how well raw scores and calibrated probabilities agree with what happened: expected
calibration error (10 equal-width bins, the bins of scikit-learn's ``calibration_curve``),
Brier score (``sklearn.metrics.brier_score_loss``) and the reliability curve.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.metrics import (
    best_f1_threshold_of,
    flatten_predictions,
    image_level_metrics,
    threshold_metrics,
)
from paligemma_xray.infer.calibrated import CALIBRATION_METHODS, Calibration, ScoreMap, image_score
from paligemma_xray.locations import Detections

RELIABILITY_BINS = 10
_POINT = re.compile(r"^(f1|sensitivity=(0?\.\d+|1(\.0*)?)|specificity=(0?\.\d+|1(\.0*)?))$")


def check_operating_point(text: str) -> tuple[str, float | None]:
    """``"f1"`` → ``("f1", None)``; ``"sensitivity=0.9"`` → ``("sensitivity", 0.9)``; else ConfigError.

    >>> check_operating_point("specificity=0.95")
    ('specificity', 0.95)
    """
    if not _POINT.match(text.strip()):
        raise ConfigError(
            f"operating point {text!r}: expected f1, sensitivity=S or specificity=S with S in (0, 1]"
        )
    kind, _, value = text.strip().partition("=")
    target = float(value) if value else None
    if target is not None and target <= 0:
        raise ConfigError(f"operating point {text!r}: the target must be above 0")
    return kind, target


def check_method(method: str) -> None:
    """ConfigError for a calibration method that is not one of :data:`CALIBRATION_METHODS`."""
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")


def _image_arrays(ground_truth, predictions, classes) -> tuple[np.ndarray, np.ndarray]:
    flat, _ = flatten_predictions(ground_truth, predictions, classes, 0.5)
    scores = np.array([image_score(p) for p in predictions], dtype=np.float64)
    return scores, flat.positive


def choose_threshold(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    operating_point: str,
    iou_threshold: float = 0.5,
) -> tuple[float | None, dict[str, Any]]:
    """The raw-score threshold of ``operating_point`` on this split, and what it gives here.

    ``f1``: the best box-level F1 (boxes matched at ``iou_threshold``).
    ``sensitivity=S``: the highest threshold whose image-level sensitivity (an image with a
    fracture has a box at or above it) is at least S. ``specificity=S``: the lowest
    threshold whose image-level specificity (an image without one has no box at or above
    it) is at least S. The second value holds the figures at that threshold on this split
    and ``reached`` (False when no threshold meets the target; the closest one is used).
    """
    kind, target = check_operating_point(operating_point)
    flat, _ = flatten_predictions(ground_truth, predictions, classes, iou_threshold)
    top = flat.max_score
    reached = True
    if kind == "f1":
        threshold = best_f1_threshold_of(flat)
        reached = threshold is not None
    elif kind == "sensitivity":
        assert target is not None  # check_operating_point: sensitivity=S always carries S
        scores = np.sort(top[flat.positive & (top > 0)])[::-1]
        n_pos = int(flat.positive.sum())
        if n_pos == 0 or len(scores) == 0:
            threshold, reached = None, False
        else:
            # The k-th highest top score of an image with a fracture keeps k of them.
            k = math.ceil(target * n_pos - 1e-9)
            reached = k <= len(scores)
            threshold = float(scores[min(k, len(scores)) - 1])
    else:
        assert target is not None  # check_operating_point: specificity=S always carries S
        negatives = np.sort(top[~flat.positive & (top > 0)])[::-1]
        n_neg = int((~flat.positive).sum())
        if n_neg == 0:
            threshold, reached = None, False
        else:
            allowed = math.floor((1 - target) * n_neg + 1e-9)  # false-positive images allowed
            if allowed >= len(negatives):
                threshold = float(flat.score.min()) if len(flat.score) else None
            else:
                # Just above the (allowed + 1)-th highest negative: that image is no longer called.
                threshold = float(np.nextafter(negatives[allowed], np.inf))
    figures: dict[str, Any] = {"reached": reached}
    if threshold is not None:
        at = threshold_metrics(flat.score, flat.tp, int(flat.gt_per_image.sum()), threshold)
        image = image_level_metrics(top, flat.positive, threshold)
        figures.update(
            {
                "precision": at["precision"],
                "recall": at["recall"],
                "f1": at["f1"],
                "image_sensitivity": image["sensitivity"],
                "image_specificity": image["specificity"],
            }
        )
    return threshold, figures


def fit_calibration(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
    *,
    method: str = "platt",
    iou_threshold: float = 0.5,
    operating_point: str = "f1",
    fitted_on: dict[str, Any] | None = None,
) -> Calibration:
    """Fit the box and image maps and choose the operating point on one (validation) split.

    Platt scaling (the default) fits two parameters and suits small validation sets;
    isotonic regression makes no shape assumption but needs more data.
    """
    check_method(method)
    flat, _ = flatten_predictions(ground_truth, predictions, classes, iou_threshold)
    image_scores, positive = _image_arrays(ground_truth, predictions, classes)
    threshold, valid = choose_threshold(ground_truth, predictions, classes, operating_point, iou_threshold)
    return Calibration(
        # ScoreMap.fit takes sequences (it applies np.asarray itself): hand it lists.
        box=ScoreMap.fit(flat.score.tolist(), flat.tp.tolist(), method),
        image=ScoreMap.fit(image_scores.tolist(), positive.tolist(), method),
        threshold=threshold,
        operating_point=operating_point.strip(),
        iou_threshold=iou_threshold,
        method=method,
        fitted_on={
            **(fitted_on or {}),
            "n_images": len(ground_truth),
            "n_positive_images": int(positive.sum()),
            "n_boxes": len(flat.score),
            "n_true_positive_boxes": int(flat.tp.sum()),
        },
        valid=valid,
    )


def calibration_figures(probabilities: ArrayLike, outcomes: ArrayLike, n_bins: int = 10) -> dict:
    """ECE, Brier score and the reliability curve of probabilities against outcomes.

    ECE: Σ over the ``n_bins`` equal-width bins of |observed rate − mean probability| ×
    the bin's share of the samples, the bins exactly those of scikit-learn's
    ``calibration_curve`` (which gives the curve). None where there is no sample.

    >>> calibration_figures([0.9, 0.1], [True, False])["ece"]
    0.1
    """
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    p = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), 0.0, 1.0)
    y = np.asarray(outcomes, dtype=bool).reshape(-1)
    if len(p) == 0:
        return {"n": 0, "ece": None, "brier": None, "curve": None}
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p)  # calibration_curve's own binning
    counts = np.bincount(bins, minlength=n_bins)
    conf = np.bincount(bins, weights=p, minlength=n_bins)
    hits = np.bincount(bins, weights=y.astype(float), minlength=n_bins)
    used = counts > 0
    ece = float((np.abs(hits[used] - conf[used]) / len(p)).sum())
    prob_true, prob_pred = calibration_curve(y.astype(int), p, n_bins=n_bins, strategy="uniform", pos_label=1)
    curve = {
        "prob_pred": [round(float(v), 6) for v in prob_pred],
        "prob_true": [round(float(v), 6) for v in prob_true],
        "count": [int(c) for c in counts[used]],
    }
    return {
        "n": len(p),
        "ece": round(ece, 6),
        "brier": round(float(brier_score_loss(y.astype(int), p, pos_label=1)), 6),
        "curve": curve,
    }


def calibration_report(
    calibration: Calibration,
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    classes: Sequence[str],
) -> dict:
    """Calibration of raw scores ("before") and calibrated probabilities ("after") on this split.

    ``box``: box scores vs "true positive at the calibration's IoU"; ``image``: top box
    score vs "the image shows a fracture".
    """
    flat, _ = flatten_predictions(ground_truth, predictions, classes, calibration.iou_threshold)
    image_scores, positive = _image_arrays(ground_truth, predictions, classes)
    return {
        "method": calibration.method,
        "fitted_on": calibration.fitted_on,
        "iou_threshold": calibration.iou_threshold,
        "box": {
            "before": calibration_figures(flat.score, flat.tp, RELIABILITY_BINS),
            "after": calibration_figures(calibration.box_probability(flat.score), flat.tp, RELIABILITY_BINS),
        },
        "image": {
            "before": calibration_figures(image_scores, positive, RELIABILITY_BINS),
            "after": calibration_figures(
                calibration.image(image_scores) if calibration.image is not None else image_scores,
                positive,
                RELIABILITY_BINS,
            ),
        },
    }
