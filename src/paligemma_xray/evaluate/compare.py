"""Comparing two models on the same images, as a reader study would.

Both evaluations must cover the same images (matched by path). Each model is judged at its
own threshold (its own operating point). The differences (first − second) in mAP, FROC
score, image-level sensitivity and specificity get paired bootstrap intervals: every
resample draws the same images for both models, so what the images have in common cancels
out. The two-sided bootstrap p-value is twice the smaller share of resampled differences
on either side of zero (capped at 1). The image-level ROC AUC difference is tested with
DeLong's method (MLstatkit's ``Delong_test``, which follows R's ``pROC::roc.test``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from paligemma_xray.errors import DataError
from paligemma_xray.evaluate.folder import PREDICTIONS_FILE, load_metrics, load_predictions
from paligemma_xray.evaluate.metrics import flatten_predictions, percentile_interval, sample_figures
from paligemma_xray.infer.calibrated import image_score
from paligemma_xray.locations import Detections

#: Figures compared (keys of :func:`~paligemma_xray.evaluate.metrics.sample_figures`).
COMPARED = (
    "map50",
    "map50_95",
    "map10_50",
    "froc_score",
    "image_sensitivity",
    "image_specificity",
    "image_auc",
)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _p_value(differences: np.ndarray) -> float | None:
    if differences.size < 2:
        return None
    below = float((differences <= 0).mean())
    above = float((differences >= 0).mean())
    return min(1.0, 2 * min(below, above))


def delong(truth: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> dict[str, Any]:
    """DeLong's test of AUC(a) − AUC(b) on the same cases (MLstatkit).

    Returns ``auc_a``, ``auc_b``, ``difference``, ``z``, ``p_value`` and ``method``:
    ``"delong"``, or None with ``z`` / ``p_value`` None where DeLong's variance of the
    difference is zero (e.g. identical scores, or both models separating the classes
    perfectly) and the test says nothing; :func:`compare_models` then gives the paired
    bootstrap's p-value. All None when a class is missing.
    """
    from MLstatkit import Delong_test

    y = np.asarray(truth, dtype=int)
    if len(y) < 2 or y.min() == y.max():
        return {"auc_a": None, "auc_b": None, "difference": None, "z": None, "p_value": None, "method": None}
    # MLstatkit's z is (AUC of its second model − AUC of its first): pass b first. Its own
    # fallback for a degenerate variance (a slow bootstrap) is not used: n_boot is minimal.
    z, p, _, _, auc_b, auc_a, info = Delong_test(
        y, np.asarray(scores_b, float), np.asarray(scores_a, float), random_state=0, n_boot=2
    )
    valid = info["method"] == "delong" and math.isfinite(z)
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": auc_a - auc_b,
        "z": z if valid else None,
        "p_value": p if valid else None,
        "method": "delong" if valid else None,
    }


def compare_models(
    ground_truth: Sequence[Detections],
    predictions_a: Sequence[Detections],
    predictions_b: Sequence[Detections],
    classes: Sequence[str],
    *,
    threshold_a: float,
    threshold_b: float,
    iou_threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two models' predictions on the same images (first − second).

    ``differences[key]``: ``value`` (on all images), ``ci95`` and ``p_value`` (paired
    bootstrap, ``bootstrap`` resamples of images seeded by ``seed``), for each key of
    :data:`COMPARED`; ``image_auc``: :func:`delong` on the images' top box scores.
    """
    if not (len(ground_truth) == len(predictions_a) == len(predictions_b)):
        raise ValueError("the two models must be evaluated on the same images")
    n = len(ground_truth)
    flat_a, _ = flatten_predictions(ground_truth, predictions_a, classes, iou_threshold)
    flat_b, _ = flatten_predictions(ground_truth, predictions_b, classes, iou_threshold)
    everything = np.arange(n)
    full_a = sample_figures(ground_truth, predictions_a, classes, flat_a, everything, threshold_a)
    full_b = sample_figures(ground_truth, predictions_b, classes, flat_b, everything, threshold_b)
    draws: dict[str, list] = {key: [] for key in COMPARED}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap if n > 1 else 0):
        draw = rng.integers(0, n, n)
        a = sample_figures(ground_truth, predictions_a, classes, flat_a, draw, threshold_a)
        b = sample_figures(ground_truth, predictions_b, classes, flat_b, draw, threshold_b)
        for key in COMPARED:
            draws[key].append(_difference(a[key], b[key]))
    differences = {}
    for key in COMPARED:
        value = _difference(full_a[key], full_b[key])
        kept = np.array([d for d in draws[key] if d is not None], dtype=np.float64)
        differences[key] = {
            "a": full_a[key],
            "b": full_b[key],
            "value": value,
            "ci95": percentile_interval(draws[key]),
            "p_value": _p_value(kept),
        }
    auc = delong(
        flat_a.positive, [image_score(p) for p in predictions_a], [image_score(p) for p in predictions_b]
    )
    if auc["method"] is None and auc["auc_a"] is not None:
        auc["p_value"] = differences["image_auc"]["p_value"]
        auc["method"] = "paired bootstrap (DeLong variance is zero)"
    return {
        "n_images": n,
        "iou_threshold": iou_threshold,
        "threshold_a": threshold_a,
        "threshold_b": threshold_b,
        "bootstrap": {"samples": bootstrap, "seed": seed, "unit": "image", "paired": True},
        "differences": differences,
        "image_auc": auc,
    }


def compare_evaluations(
    rows_a: Sequence[dict],
    metrics_a: dict,
    rows_b: Sequence[dict],
    metrics_b: dict,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """:func:`compare_models` on two evaluation folders' rows (``load_predictions``) and metrics.

    The images are paired by path; :class:`DataError` when the folders do not hold the same
    images, since an unpaired comparison is not what this test measures.
    """
    by_image = {row["image"]: row for row in rows_b}
    missing = [row["image"] for row in rows_a if row["image"] not in by_image]
    if missing or len(by_image) != len(rows_a):
        raise DataError(
            f"the two evaluations do not cover the same images ({len(rows_a)} vs {len(rows_b)}; "
            f"e.g. {missing[0] if missing else 'an extra image in the second'}): evaluate both on the "
            "same data set and split",
            path=metrics_b.get("out"),
        )
    paired_b = [by_image[row["image"]] for row in rows_a]
    result = compare_models(
        [row["ground_truth"] for row in rows_a],
        [row["prediction"] for row in rows_a],
        [row["prediction"] for row in paired_b],
        metrics_a.get("classes", []),
        threshold_a=float(metrics_a.get("threshold") or 0.0),
        threshold_b=float(metrics_b.get("threshold") or 0.0),
        iou_threshold=float(metrics_a.get("iou_threshold", 0.5)),
        bootstrap=bootstrap,
        seed=seed,
    )
    result["names"] = list(names)
    return result


COMPARISON_FILE = "comparison.json"


def check_compare(other_dir: str | Path) -> None:
    """DataError (naming the file) unless ``other_dir`` is a readable evaluation folder."""
    load_metrics(other_dir)
    if not (Path(other_dir) / PREDICTIONS_FILE).is_file():
        load_predictions(other_dir)  # raises the DataError naming the missing file


def write_comparison(
    eval_dir: str | Path, other_dir: str | Path, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Compare the evaluation in ``eval_dir`` (first) with ``other_dir``; write ``comparison.json``.

    The file lands in ``eval_dir``; ``write_report(eval_dir, compare=other_dir)`` shows it.
    """
    from paligemma_xray.atomic import write_json

    metrics_a, metrics_b = load_metrics(eval_dir), load_metrics(other_dir)
    result = compare_evaluations(
        load_predictions(eval_dir),
        {**metrics_a, "out": str(eval_dir)},
        load_predictions(other_dir),
        {**metrics_b, "out": str(other_dir)},
        bootstrap=bootstrap,
        seed=seed,
        names=(str(metrics_a.get("model", eval_dir)), str(metrics_b.get("model", other_dir))),
    )
    result["against"] = str(Path(other_dir).resolve())
    write_json(Path(eval_dir) / COMPARISON_FILE, result)
    return result
