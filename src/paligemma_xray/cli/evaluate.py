"""``paligemma-xray evaluate``: score a model on a data set split, write the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paligemma_xray.cli.parser import say, verb
from paligemma_xray.evaluate.settings import EvaluateSettings

EXAMPLES = [
    "paligemma-xray evaluate --model runs/r1 --data my-set --out eval-r1",
    "paligemma-xray evaluate --model runs/r1 --data my-set --out eval-r1 --operating-point f1",
]


def evaluate(settings: EvaluateSettings) -> int:
    from paligemma_xray.report.pipeline import evaluate_and_report

    result = evaluate_and_report(settings, log=say)
    if result.report is not None:  # the main process (under torchrun)
        print(json.dumps(result.headline))
        say(f"metrics: {Path(settings.out) / 'metrics.json'}\nreport:  {result.report}")
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "evaluate",
        evaluate,
        help="score a model on a data set split: metrics.json, predictions and the HTML report",
        description="Detect on every image of SPLIT of data set D and write into OUT:\n"
        "metrics.json (mAP@0.5, mAP@[.5:.95], mAP@[.1:.5] (nnDetection's medical mAP),\n"
        "AP per class, precision/recall/F1 at the threshold, FROC and its CPM score,\n"
        "image-level sensitivity/specificity/AUC, calibration, bootstrap 95% CIs,\n"
        "duplicate boxes, parse failures), predictions.jsonl, COCO files, report.html.\n"
        "--operating-point chooses the threshold on the valid split, fits the calibrated\n"
        "probabilities there, and saves both with the model (calibration.json), which\n"
        "predict and serve then default to.\n"
        "Several GPUs: torchrun --nproc_per_node N -m paligemma_xray.cli evaluate …",
        examples=EXAMPLES,
        settings=EvaluateSettings,
    )
