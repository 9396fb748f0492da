"""Evaluation: COCO-exact mAP, FROC, image-level figures with bootstrap intervals.

``evaluate_detections`` scores Detections you already have (training calls it);
``evaluate`` runs a Detector on a data set split and writes ``metrics.json`` and the
predictions. The runner (and with it torch) is imported on first use, so that metrics
alone stay light.
"""

from paligemma_xray.evaluate.metrics import FROC_FP_RATES, best_f1_threshold, evaluate_detections, match

__all__ = [
    "FROC_FP_RATES",
    "best_f1_threshold",
    "evaluate",
    "evaluate_detections",
    "load_metrics",
    "load_predictions",
    "match",
]


def __getattr__(name: str):
    if name == "evaluate":
        from paligemma_xray.evaluate import runner

        return runner.evaluate
    if name in ("load_metrics", "load_predictions"):
        from paligemma_xray.evaluate import folder

        return getattr(folder, name)
    raise AttributeError(name)
