"""Validation during training: the loss over the validation split, and the detection figures
of the evaluation layer, computed through the same :class:`~paligemma_xray.infer.Detector`
and :func:`~paligemma_xray.evaluate.runner.evaluate_records` as ``paligemma-xray evaluate``.

So ``best/`` is chosen by the decoder users later run, and the mAP a run records at a step
is the mAP ``evaluate`` reports for the weights of that step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paligemma_xray.data import Record
from paligemma_xray.data.bad_records import BadRecords
from paligemma_xray.evaluate.runner import evaluate_records
from paligemma_xray.infer.detector import Detector
from paligemma_xray.model.processing import build_batch
from paligemma_xray.train.loss import suffix_loss
from paligemma_xray.train.recipes import TrainConfig
from paligemma_xray.train.strategies import unwrap

# Issues that mean an object of the output was dropped (see locations.PARSE_ISSUE_KINDS).
_DROPPED = ("truncated", "inverted", "empty_label")


@torch.no_grad()
def validate(
    model: nn.Module,
    processor: Any,
    records: list[Record],
    config: TrainConfig,
    *,
    device: torch.device,
    bf16: bool,
    accelerator: Any,
    return_rows: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], list[dict]]:
    """``val_loss`` (per-example mean, then mean) over ALL ``records``; with ``eval_decode``
    also ``parse_rate`` (answers that ended and lost no object) and COCO ``map50`` /
    ``map50_95``. Records are shared out over processes and the results gathered.
    ``return_rows``: also return the decoded rows (``evaluate_records``' rows; empty
    without ``eval_decode``), what a run's ``progress.html`` draws."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    val_loss, skipped = _loss(model, processor, records, config, device, autocast, accelerator)
    metrics: dict[str, Any] = {"val_loss": val_loss, "val_skipped_records": skipped}
    rows: list[dict] = []
    if config.eval_decode:
        detector = Detector(
            unwrap(model), processor, model_id=str(config.out), batch_size=config.eval_batch_size
        )
        with autocast:
            rows, figures = evaluate_records(
                detector,
                records,
                bootstrap=0,
                curves=False,
                max_new_tokens=config.eval_max_new_tokens,
                max_bad_records=config.max_bad_records,
                progress=False,
            )
        parsed = [
            row["finished"] and not any(row["prediction"]["parse_issues"].get(k, 0) for k in _DROPPED)
            for row in rows
        ]
        metrics["parse_rate"] = sum(parsed) / max(len(parsed), 1)
        metrics.update(map50=figures.get("map50"), map50_95=figures.get("map50_95"))
    if was_training:
        model.train()
    return (metrics, rows) if return_rows else metrics


def _loss(
    model: nn.Module,
    processor: Any,
    records: list[Record],
    config: TrainConfig,
    device: torch.device,
    autocast: torch.autocast,
    accelerator: Any,
) -> tuple[float, int]:
    """(mean loss, records skipped) over this process's share of ``records``, gathered.

    Images are read through the training stream's policy (:class:`BadRecords`): an
    unreadable one is skipped, counted and named; more than ``max_bad_records`` in one
    pass (on this process) stop the run with a DataError naming ``file:line``.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(records), world))
    bad = BadRecords(config.max_bad_records)
    loss_sum, count = 0.0, 0
    for s in range(0, len(mine), config.eval_batch_size):
        readable = list(bad.images(records[i] for i in mine[s : s + config.eval_batch_size]))
        if not readable:
            continue
        chunk = [record for record, _ in readable]
        images = [image for _, image in readable]
        batch = build_batch(
            processor,
            images,
            [r.prefix for r in chunk],
            [r.suffix for r in chunk],
            max_length=config.max_length,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            per_example = suffix_loss(model, batch).per_example(len(chunk))
        valid = ~torch.isnan(per_example)
        loss_sum += float(per_example[valid].sum())
        count += int(valid.sum())
    totals = [loss_sum, count, bad.count]
    if world > 1:
        t = torch.tensor(totals, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        totals = t.tolist()
    return totals[0] / max(totals[1], 1), int(totals[2])
