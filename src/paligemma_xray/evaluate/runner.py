"""``evaluate(detector, dataset, split, out_dir)``: run the detector on a split, score it.

Writes to ``out_dir``:

* ``metrics.json`` — everything :func:`~paligemma_xray.evaluate.metrics.evaluate_detections`
  returns, plus the model, data set, split and decoding settings;
* ``predictions.jsonl`` — one line per image: its path, the prompt, the decoded text, the
  ground truth and the scored predictions (``Detections.to_json``); what the report and
  :func:`load_predictions` read back;
* ``ground_truth.coco.json`` and ``predictions.coco.json`` — the same in COCO form for
  other tools;
* with an operating point: ``calibration.json`` (fitted on the valid split, whose own
  evaluation lands in ``valid/``), also saved with the model when asked.

Every file is written under a temporary name and renamed when complete
(:mod:`paligemma_xray.atomic`); a folder holding an earlier evaluation is replaced only with
``overwrite=True``. A record whose image cannot be decoded is skipped and counted
(``skipped_records`` in the metrics, with its ``file:line``); more than ``max_bad_records``
stop the evaluation.

Under ``torchrun`` each rank decodes every ``world_size``-th image; the shards are merged
in image order before scoring, so the files are those of a single-process run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from paligemma_xray import atomic
from paligemma_xray.data import Dataset, Record, record_targets
from paligemma_xray.data.bad_records import DEFAULT_MAX_BAD_RECORDS, BadRecords
from paligemma_xray.errors import ConfigError, DataError, check_output
from paligemma_xray.evaluate.calibration import (
    calibration_report,
    check_method,
    check_operating_point,
    fit_calibration,
)
from paligemma_xray.evaluate.metrics import check_options, coco_dicts, evaluate_detections
from paligemma_xray.infer.calibration import Calibration, calibration_path
from paligemma_xray.infer.detector import DEFAULT_DETECT_TOKENS, Detector
from paligemma_xray.infer.distributed import barrier, gather_indexed, shard, world
from paligemma_xray.locations import Detections, classes_from_prefix
from paligemma_xray.progress import bar as progress_bar

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
CALIBRATION_FILE = "calibration.json"
VALID_DIR = "valid"


class _Decoding(TypedDict):
    # The decoding options of evaluate_records, passed on as they came.
    batch_size: int | None
    max_new_tokens: int
    progress: bool
    max_bad_records: int | None


def dataset_classes(prefixes: Sequence[str]) -> list[str]:
    """Class names asked for by the prefixes, in order of first appearance."""
    classes: list[str] = []
    for prefix in prefixes:
        for name in classes_from_prefix(prefix):
            if name not in classes:
                classes.append(name)
    return classes


def check_evaluation(
    dataset: Dataset,
    split: str,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    bootstrap: int = 1000,
    overwrite: bool = False,
    max_bad_records: int | None = DEFAULT_MAX_BAD_RECORDS,
    operating_point: str | None = None,
    calibration_method: str = "platt",
) -> list[Record]:
    """Every check that needs no model, so that mistakes show before the model loads.

    Returns the split's usable records. Raises a
    :class:`~paligemma_xray.errors.PaligemmaXrayError` for bad numbers, an output that cannot
    be written or holds an earlier evaluation (without ``overwrite``), and a split that is
    missing or has no usable record.
    """
    check_options(threshold=threshold, iou_threshold=iou_threshold, bootstrap=bootstrap)
    check_method(calibration_method)
    if operating_point is not None:
        check_operating_point(operating_point)
    BadRecords(max_bad_records)  # a negative limit is refused here
    out = check_output(out_dir, folder=True)
    if not overwrite and any((out / name).exists() for name in (METRICS_FILE, PREDICTIONS_FILE)):
        raise ConfigError(
            "holds an earlier evaluation; add --overwrite to replace it, or give another --out", path=out
        )
    return dataset.usable(split)  # DataError when missing or empty


def evaluate_records(
    detector: Detector,
    records: Sequence[Record],
    *,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_DETECT_TOKENS,
    progress: bool = True,
    curves: bool = True,
    desc: str = "evaluate",
    max_bad_records: int | None = DEFAULT_MAX_BAD_RECORDS,
) -> tuple[list[dict], dict]:
    """Detect on ``records`` and score them: ``(rows, metrics)``, writing nothing.

    The one evaluation procedure: :func:`evaluate` writes its result, and training's
    validation calls it on the model being trained, so that the mAP a run records is the
    mAP ``paligemma-xray evaluate`` reports for the same weights. ``rows``: one dict per
    record, in record order (see :func:`save_evaluation`); ``metrics``: what
    :func:`~paligemma_xray.evaluate.metrics.evaluate_detections` returns. Under a launcher
    each rank decodes its shard and every rank gets the merged result.

    A record whose image cannot be decoded is skipped, named by ``file:line`` in
    ``metrics["skipped_records"]``; more than ``max_bad_records`` raise a DataError.
    """
    w = world()
    mine = list(shard(records, w))
    results: list[tuple[int, dict]] = []
    bar = progress_bar(total=len(mine), desc=desc, unit="img", enabled=progress and w.is_main)
    bad = BadRecords(max_bad_records)
    kept: list[tuple[int, Record]] = []
    prompts: list[str] = []  # grows with `kept`: the detector slices it batch by batch
    skipped_here: list[tuple[int, str]] = []

    def images():
        for index, record in mine:
            image = bad.load(record)
            if image is None:
                skipped_here.append((index, f"{record.where}: {bad.skipped[-1][1]}"))
                bar.update(1)
                continue
            kept.append((index, record))
            prompts.append(record.prefix)
            yield image

    stream = detector.iter_detect(
        images(), prompt=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    for number, (generation, found) in enumerate(stream):
        index, record = kept[number]
        truth = record_targets(record, found.image_size)
        results.append(
            (
                index,
                {
                    "index": index,
                    "image": str(record.image),
                    "prompt": record.prefix,
                    "text": generation.text,
                    "finished": generation.finished,
                    "ground_truth": truth.to_json(),
                    "prediction": found.to_json(),
                },
            )
        )
        bar.update(1)
    bar.close()
    rows = gather_indexed(results, w)
    skipped = gather_indexed(skipped_here, w)
    if not rows:
        raise DataError(
            f"not one image of these {len(records)} records could be read; the first: {skipped[0]}"
        )
    ground_truth = [Detections.from_json(row["ground_truth"]) for row in rows]
    predictions = [Detections.from_json(row["prediction"]) for row in rows]
    classes = dataset_classes([record.prefix for record in records])
    metrics = evaluate_detections(
        ground_truth, predictions, classes, threshold=threshold, iou_threshold=iou_threshold,
        bootstrap=bootstrap, seed=seed, curves=curves,
    )  # fmt: skip
    metrics["skipped_records"] = {"count": len(skipped), "records": skipped}
    return rows, metrics


def evaluate(
    detector: Detector,
    dataset: Dataset,
    split: str,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    iou_threshold: float = 0.5,
    operating_point: str | None = None,
    calibration_method: str = "platt",
    save_with_model: str | Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_DETECT_TOKENS,
    progress: bool = True,
    overwrite: bool = False,
    max_bad_records: int | None = DEFAULT_MAX_BAD_RECORDS,
) -> dict:
    """Detect on every image of ``split``, write the files above, return the metrics.

    Each image is prompted with its own record's prefix (``detect fracture`` in the usual
    set), so multi-class sets are evaluated with the classes they ask for.

    The score threshold of precision, recall and the image-level figures: ``threshold``
    when given; else, with ``operating_point`` (``f1``, ``sensitivity=S``,
    ``specificity=S``), the one chosen on the ``valid`` split, where the calibration
    (``calibration_method``: ``platt`` or ``isotonic``) is fitted too and, with
    ``save_with_model`` (the model's path), saved beside its weights; else the one saved
    with the model (``detector.calibration``); else this split's own best-F1 threshold,
    labelled as such. ``iou_threshold``: the hit criterion of those figures (0.1 is the
    usual medical one; COCO's mAP keeps its own).
    """
    records = check_evaluation(  # before hours of decoding
        dataset, split, out_dir, threshold=threshold, iou_threshold=iou_threshold, bootstrap=bootstrap,
        overwrite=overwrite, max_bad_records=max_bad_records, operating_point=operating_point,
        calibration_method=calibration_method,
    )  # fmt: skip
    out = Path(out_dir).expanduser()
    w = world()
    classes = dataset_classes([record.prefix for record in records])
    calibration: Calibration | None = getattr(detector, "calibration", None)
    source = "saved with the model"
    decoding: _Decoding = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "progress": progress,
        "max_bad_records": max_bad_records,
    }
    if operating_point is not None:
        valid_rows, valid_metrics = evaluate_records(
            detector, dataset.usable(VALID_DIR), iou_threshold=iou_threshold, bootstrap=0,
            desc=f"evaluate {VALID_DIR}", **decoding,
        )  # fmt: skip
        valid_classes = valid_metrics["classes"]
        ground_truth = [Detections.from_json(row["ground_truth"]) for row in valid_rows]
        predictions = [Detections.from_json(row["prediction"]) for row in valid_rows]
        calibration = fit_calibration(
            ground_truth,
            predictions,
            valid_classes,
            method=calibration_method,
            iou_threshold=iou_threshold,
            operating_point=operating_point,
            fitted_on={"model": detector.model_id, "data": str(dataset.root), "split": VALID_DIR},
        )
        source = f"chosen on the {VALID_DIR} split"
        if w.is_main:
            valid_metrics = evaluate_detections(
                ground_truth, predictions, valid_classes, threshold=calibration.threshold,
                iou_threshold=iou_threshold, bootstrap=0,
            )  # fmt: skip
            valid_metrics.update({"model": detector.model_id, "data": str(dataset.root), "split": VALID_DIR})
            save_evaluation(out / VALID_DIR, valid_rows, valid_metrics)
            calibration.save(out / CALIBRATION_FILE)
            if save_with_model is not None:
                calibration.save(calibration_path(save_with_model))
    # The calibration whose operating point gives the threshold, if one does.
    point = (
        calibration
        if threshold is None and calibration is not None and calibration.threshold is not None
        else None
    )
    if point is not None:
        threshold = point.threshold

    started = time.perf_counter()
    if operating_point is not None and split == VALID_DIR:  # decoded already: score it again
        rows = valid_rows
        metrics = evaluate_detections(
            [Detections.from_json(row["ground_truth"]) for row in rows],
            [Detections.from_json(row["prediction"]) for row in rows],
            classes, threshold=threshold, iou_threshold=iou_threshold, bootstrap=bootstrap, seed=seed,
        )  # fmt: skip
    else:
        rows, metrics = evaluate_records(
            detector, records, threshold=threshold, iou_threshold=iou_threshold, bootstrap=bootstrap,
            seed=seed, desc=f"evaluate {split}", **decoding,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    if point is not None:
        metrics["threshold_source"] = "operating_point"
        metrics["operating_point"] = {
            "name": point.operating_point,
            "threshold": point.threshold,
            "source": source,
            "valid": point.valid,
        }
    if calibration is not None:
        ground_truth = [Detections.from_json(row["ground_truth"]) for row in rows]
        predictions = [Detections.from_json(row["prediction"]) for row in rows]
        metrics["calibration"] = calibration_report(calibration, ground_truth, predictions, classes)
    metrics.update(
        {
            "model": detector.model_id,
            "dtype": getattr(detector, "dtype", None),  # the weights' (bfloat16 on a bf16 CPU)
            "data": str(dataset.root),
            "split": split,
            "max_new_tokens": max_new_tokens,
            "box_or_stop": detector.box_or_stop,
            "min_box_probability": detector.min_box_probability,
            "unfinished_answers": sum(1 for row in rows if not row["finished"]),
            "seconds": round(seconds, 3),
            "world_size": w.size,
        }
    )
    if w.is_main:
        save_evaluation(out, rows, metrics)
    barrier(w)
    return metrics


def save_evaluation(out_dir: str | Path, rows: Sequence[dict], metrics: dict) -> None:
    """Write an evaluation folder: ``predictions.jsonl``, the COCO files, ``metrics.json``.

    ``rows``: one dict per image with ``image`` (path), ``prompt``, ``text``, ``finished``,
    and ``ground_truth`` / ``prediction`` as ``Detections.to_json()`` dicts.
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
    atomic.write_json(out / "ground_truth.coco.json", gt_dict)
    atomic.write_json(out / "predictions.coco.json", coco_results)
    atomic.write_json(out / METRICS_FILE, metrics)


def load_predictions(eval_dir: str | Path) -> list[dict]:
    """The rows of ``predictions.jsonl`` with ``ground_truth`` / ``prediction`` as Detections."""
    from paligemma_xray.errors import DataError

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


def load_metrics(eval_dir: str | Path) -> dict:
    """``metrics.json`` of an evaluation folder; DataError naming the file if absent or broken."""
    from paligemma_xray.errors import DataError

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
