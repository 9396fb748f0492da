"""The evaluation folder: its file names, and the one writer and readers of its files.

``paligemma-xray evaluate`` writes it (:func:`save_evaluation`), the report, the comparison
and ``evaluate --compare`` read it back (:func:`load_metrics`, :func:`load_predictions`).
No torch and no transformers here: reading an evaluation is reading JSON.

Files:

* ``metrics.json`` — the figures and the settings they were computed with;
* ``predictions.jsonl`` — one row per image: ``index``, ``image`` (its path), ``prompt``,
  ``text``, ``finished`` and ``ground_truth`` / ``prediction`` (``Detections.to_json``);
* ``ground_truth.coco.json``, ``predictions.coco.json`` — the same in COCO form;
* ``valid/`` — with an operating point, the evaluation of the split it was chosen on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paligemma_xray import atomic
from paligemma_xray.errors import DataError
from paligemma_xray.evaluate.metrics import coco_dicts
from paligemma_xray.locations import Detections, classes_from_prefix

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
GROUND_TRUTH_COCO_FILE = "ground_truth.coco.json"
PREDICTIONS_COCO_FILE = "predictions.coco.json"
VALID_DIR = "valid"


def dataset_classes(prefixes: Sequence[str]) -> list[str]:
    """Class names asked for by the prefixes, in order of first appearance."""
    classes: list[str] = []
    for prefix in prefixes:
        for name in classes_from_prefix(prefix):
            if name not in classes:
                classes.append(name)
    return classes


def holds_evaluation(folder: str | Path) -> bool:
    """Whether ``folder`` already holds an evaluation's results."""
    return any((Path(folder) / name).exists() for name in (METRICS_FILE, PREDICTIONS_FILE))


def save_evaluation(out_dir: str | Path, rows: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Write an evaluation folder: ``predictions.jsonl``, the COCO files, ``metrics.json``.

    ``rows``: one dict per image with ``image`` (path), ``prompt``, ``text``, ``finished``,
    and ``ground_truth`` / ``prediction`` as ``Detections.to_json()`` dicts. Each file is
    written atomically, ``metrics.json`` last.
    """
    out = Path(out_dir)
    with atomic.open_for_write(out / PREDICTIONS_FILE) as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    ground_truth = [Detections.from_json(row["ground_truth"]) for row in rows]
    predictions = [Detections.from_json(row["prediction"]) for row in rows]
    gt_dict, coco_results = coco_dicts(
        ground_truth, predictions, metrics.get("classes", []), range(len(rows))
    )
    for image, row in zip(gt_dict["images"], rows):
        image["file_name"] = row["image"]
    atomic.write_json(out / GROUND_TRUTH_COCO_FILE, gt_dict)
    atomic.write_json(out / PREDICTIONS_COCO_FILE, coco_results)
    atomic.write_json(out / METRICS_FILE, metrics)


def load_predictions(eval_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``predictions.jsonl`` with ``ground_truth`` / ``prediction`` as Detections.

    Raises:
        DataError: no such file, or a line that is not a row, naming ``file:line``.
    """
    path = Path(eval_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError("no predictions file here (run `paligemma-xray evaluate` first)", path=path)
    rows = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["ground_truth"] = Detections.from_json(row["ground_truth"])
                row["prediction"] = Detections.from_json(row["prediction"])
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                message = f"unreadable prediction line: {error!r}"
                raise DataError(message, path=path, line=line_number) from None
            rows.append(row)
    return rows


def load_metrics(eval_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of an evaluation folder; DataError naming the file if absent or broken."""
    path = Path(eval_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise DataError("no metrics file here (run `paligemma-xray evaluate` first)", path=path) from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON: {error}", path=path) from None
    if not isinstance(metrics, dict):
        raise DataError(f"expected a JSON object, got {type(metrics).__name__}", path=path)
    return metrics
