"""The whole ``evaluate`` verb as one call: check, load, evaluate, compare, report.

It lives in ``report/`` because it ends with the report: ``evaluate/`` does not import
``report/`` (layer order), so the step that joins them sits here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paligemma_xray.evaluate.settings import EvaluateSettings


@dataclass
class EvaluationResult:
    """What ``evaluate`` produced: the metrics, and (on the main process) where they are."""

    metrics: dict[str, Any]
    report: Path | None
    """The HTML report (None on a non-main rank under torchrun)."""
    calibration: Path | None
    """Where the fitted calibration was saved beside the model, if it was."""

    @property
    def headline(self) -> dict[str, Any]:
        """The figures ``evaluate`` prints as one JSON line (:func:`headline`)."""
        return headline(self.metrics)


def evaluate_and_report(
    settings: EvaluateSettings, *, progress: bool = True, log: Callable[[str], None] | None = None
) -> EvaluationResult:
    """Check everything that needs no model, load the detector, evaluate, compare, report.

    Mistakes in the data set, the output folder, ``--compare`` or ``--run`` are raised
    before the model loads. The report (``OUT/report.html``) and, with ``settings.compare``,
    ``OUT/comparison.json`` are written by the main process only. ``log`` hears where the
    calibration was saved beside the model; the caller prints the result.
    """
    from paligemma_xray.evaluate.compare import write_comparison
    from paligemma_xray.evaluate.runner import check_evaluation, evaluate
    from paligemma_xray.infer.calibrated import calibration_path
    from paligemma_xray.infer.distributed import world
    from paligemma_xray.report.html import write_report

    dataset, _ = check_evaluation(settings)  # a typo must not cost the model's loading time
    detector = settings.load_detector(progress=progress)
    metrics = evaluate(detector, settings, dataset=dataset, progress=progress)
    owner = settings.calibration_owner()
    saved = calibration_path(owner) if owner is not None and settings.operating_point is not None else None
    if not world().is_main:
        return EvaluationResult(metrics, None, saved)
    if settings.compare is not None:
        write_comparison(settings.out, settings.compare, bootstrap=settings.bootstrap, seed=settings.seed)
    report = write_report(settings.out, run_dir=settings.run, compare=settings.compare)
    if log is not None and saved is not None:
        log(f"calibration and operating point saved with the model: {saved}")
    return EvaluationResult(metrics, report, saved)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The line `evaluate` prints: threshold-free figures first, then those at its threshold."""
    point = metrics.get("operating_point") or {}
    threshold = metrics.get("threshold")
    return {
        "map50": metrics.get("map50"),
        "map50_95": metrics.get("map50_95"),
        "map10_50": metrics.get("map10_50"),
        "froc_score": metrics.get("froc", {}).get("score"),
        "image_auc": metrics.get("image_level", {}).get("auc"),
        "threshold": None if threshold is None else float(f"{threshold:.3g}"),
        "threshold_source": point.get("name") or metrics.get("threshold_source"),
        "iou": metrics.get("iou_threshold"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "image_sensitivity": metrics.get("image_level", {}).get("sensitivity"),
        "image_specificity": metrics.get("image_level", {}).get("specificity"),
        "duplicate_boxes": metrics.get("duplicates", {}).get("boxes"),
    }
