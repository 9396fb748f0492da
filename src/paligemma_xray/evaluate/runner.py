"""``evaluate(detector, dataset, split, out_dir)``: run the detector on a split, score it.

Writes to ``out_dir`` (the folder's format is owned by :mod:`paligemma_xray.evaluate.folder`):

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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from paligemma_xray.data import Dataset, Record, open_dataset, record_targets
from paligemma_xray.data.bad_records import DEFAULT_MAX_BAD_RECORDS, BadRecords
from paligemma_xray.errors import ConfigError, DataError, check_output
from paligemma_xray.evaluate.calibrate import calibration_report, fit_calibration
from paligemma_xray.evaluate.folder import VALID_DIR, dataset_classes, holds_evaluation, save_evaluation
from paligemma_xray.evaluate.metrics import evaluate_detections
from paligemma_xray.evaluate.settings import EvaluateSettings
from paligemma_xray.infer.calibrated import save_with_model as save_calibration_with_model
from paligemma_xray.infer.detector import DetectorLike
from paligemma_xray.infer.distributed import barrier, gather_indexed, shard, world
from paligemma_xray.infer.masks import decode_masks
from paligemma_xray.infer.settings import DEFAULT_DETECT_TOKENS
from paligemma_xray.locations import Detections
from paligemma_xray.model.fingerprint import fingerprint
from paligemma_xray.model.forms import CALIBRATION_FILE
from paligemma_xray.progress import bar as progress_bar


class _Decoding(TypedDict):
    # The decoding options of evaluate_records, passed on as they came.
    batch_size: int | None
    max_new_tokens: int
    progress: bool
    max_bad_records: int | None


def check_evaluation(
    settings: EvaluateSettings, dataset: Dataset | None = None
) -> tuple[Dataset, list[Record]]:
    """Every check that needs no model, so that mistakes show before the model loads.

    (The values themselves were checked when ``settings`` was built.) Opens the data set
    (unless given) and returns it with the split's usable records. Raises a
    :class:`~paligemma_xray.errors.PaligemmaXrayError` for an output that cannot be written
    or holds an earlier evaluation (without ``overwrite``), a split that is missing or has
    no usable record, and a ``--compare`` / ``--run`` folder that is not there.
    """
    if dataset is None:
        dataset = open_dataset(settings.data, allow_outside_images=settings.allow_outside_images)
    out = check_output(settings.out, folder=True)
    if not settings.overwrite and holds_evaluation(out):
        raise ConfigError(
            "holds an earlier evaluation; add --overwrite to replace it, or give another --out", path=out
        )
    records = dataset.usable(settings.split)  # DataError when missing or empty
    settings.check_paths()
    return dataset, records


def evaluate_records(
    detector: DetectorLike,
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
    undecoded_truth = 0  # records whose <seg> codes need --seg-vae to become masks

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
        if (truth.seg_codes >= 0).all(axis=1).any():  # a segmentation set: <seg> codes in the suffix
            decoder = detector.mask_decoder
            if decoder is None:
                undecoded_truth += 1
            else:
                truth = decode_masks(decoder, truth)
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
    if undecoded_truth:
        metrics["masks_not_evaluated"] = (
            f"{undecoded_truth} record(s) carry <seg> mask codes; give --seg-vae vae-oid.npz "
            "to evaluate masks"
        )
    return rows, metrics


def evaluate(
    detector: DetectorLike,
    settings: EvaluateSettings,
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
) -> dict:
    """Detect on every image of ``settings.split``, write the files above, return the metrics.

    Each image is prompted with its own record's prefix (``detect fracture`` in the usual
    set), so multi-class sets are evaluated with the classes they ask for. ``dataset``: the
    data set already open (default: ``settings.data`` is opened).

    The score threshold of precision, recall and the image-level figures: ``threshold``
    when given; else, with ``operating_point`` (``f1``, ``sensitivity=S``,
    ``specificity=S``), the one chosen on the ``valid`` split, where the calibration
    (``calibration_method``: ``platt`` or ``isotonic``) is fitted too and saved beside the
    model's weights (:meth:`EvaluateSettings.calibration_owner`); else the one saved
    with the model (``detector.calibration``); else this split's own best-F1 threshold,
    labelled as such. ``iou_threshold``: the hit criterion of those figures (0.1 is the
    usual medical one; COCO's mAP keeps its own).
    """
    dataset, records = check_evaluation(settings, dataset)  # before hours of decoding
    split, threshold, iou_threshold = settings.split, settings.threshold, settings.iou_threshold
    operating_point, bootstrap, seed = settings.operating_point, settings.bootstrap, settings.seed
    max_new_tokens, max_bad_records = settings.max_new_tokens, settings.max_bad_records
    save_with_model = settings.calibration_owner()
    out = Path(settings.out).expanduser()
    w = world()
    classes = dataset_classes([record.prefix for record in records])
    calibration = detector.calibration
    source = "saved with the model"
    decoding: _Decoding = {
        "batch_size": settings.batch_size,
        "max_new_tokens": max_new_tokens,
        "progress": progress,
        "max_bad_records": max_bad_records,
    }
    # The weights the calibration will be fitted on, fingerprinted before hours of decoding
    # (weights replaced meanwhile then do not get it), by the process that saves it.
    stamp = operating_point is not None and save_with_model is not None and w.is_main
    weights = fingerprint(save_with_model) if stamp and save_with_model is not None else None
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
            method=settings.calibration_method,
            iou_threshold=iou_threshold,
            operating_point=operating_point,
            fitted_on={"model": detector.model_id, "data": str(dataset.root), "split": VALID_DIR},
        )
        calibration.weights = weights
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
                save_calibration_with_model(calibration, save_with_model, weights=weights)
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
            "dtype": detector.dtype,  # the weights' (bfloat16 on a bf16 CPU)
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
