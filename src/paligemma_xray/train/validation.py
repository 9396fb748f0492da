"""Validation during training: loss over the validation split, and decoded-output figures."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paligemma_xray.locations import classes_from_prefix, parse
from paligemma_xray.model.processing import build_batch
from paligemma_xray.train.loss import suffix_loss, unwrap
from paligemma_xray.train.recipes import TrainConfig

# Issues that mean an object of the output was dropped (see locations.PARSE_ISSUE_KINDS).
_DROPPED = ("truncated", "inverted", "empty_label")


def _load_image(path):
    from paligemma_xray.data import load_image

    return load_image(path)


@torch.no_grad()
def validate(
    model: nn.Module,
    processor: Any,
    records: list,
    config: TrainConfig,
    *,
    device: torch.device,
    bf16: bool,
    accelerator: Any,
) -> dict[str, Any]:
    """Validation loss (per-example mean, then mean) over ALL ``records``, and with
    ``eval_decode`` the greedy-decoded outputs' parse rate and, when the evaluation module
    is present, COCO mAP. Records are shared out over processes and the results gathered."""
    from paligemma_xray.infer.decode import greedy_decode

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(records), world))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loss_sum, count = 0.0, 0
    results: list[tuple[int, dict, dict]] = []
    eos = processor.tokenizer.eos_token_id
    for s in range(0, len(mine), config.eval_batch_size):
        chunk = [records[i] for i in mine[s : s + config.eval_batch_size]]
        images = [_load_image(r.image) for r in chunk]
        prefixes, suffixes = [r.prefix for r in chunk], [r.suffix for r in chunk]
        batch = build_batch(processor, images, prefixes, suffixes, max_length=config.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            per_example = suffix_loss(model, batch).per_example(len(chunk))
        valid = ~torch.isnan(per_example)
        loss_sum += float(per_example[valid].sum())
        count += int(valid.sum())
        if not config.eval_decode:
            continue
        prompts = build_batch(processor, images, prefixes)
        prompts = {k: v.to(device) for k, v in prompts.items()}
        with autocast:
            decoded = greedy_decode(
                unwrap(model), prompts, max_new_tokens=config.eval_max_new_tokens, eos_token_id=eos
            )
        for j, record in enumerate(chunk):
            size = images[j].size
            classes = classes_from_prefix(record.prefix)
            pieces = _pieces(processor.tokenizer, decoded.tokens[j], eos)
            text = "".join(pieces)
            found = parse(text, size, classes, token_logprobs=list(zip(pieces, decoded.logprobs[j])))
            truth = parse(record.suffix, size, classes)
            ok = decoded.finished[j] and not any(found.parse_issues.get(k, 0) for k in _DROPPED)
            results.append((mine[s + j], {"ok": ok, "pred": found.to_json()}, truth.to_json()))

    metrics: dict[str, Any] = {}
    totals = [loss_sum, count]
    if world > 1:
        t = torch.tensor(totals, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        totals = t.tolist()
    metrics["val_loss"] = totals[0] / max(totals[1], 1)
    if config.eval_decode:
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)
        results.sort(key=lambda r: r[0])
        metrics["parse_rate"] = sum(r[1]["ok"] for r in results) / max(len(results), 1)
        metrics.update(_map(results, records))
    if was_training:
        model.train()
    return metrics


def _pieces(tokenizer, tokens: list[int], eos: int) -> list[str]:
    """Text of each generated token (EOS gives ""), so that the pieces concatenate to the
    decoded text (SentencePiece drops a leading space only at the very start)."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        ids = [t for t in tokens[: i + 1] if t != eos]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        pieces.append(text[len(previous) :] if text.startswith(previous) else "")
        previous = text if text.startswith(previous) else previous
    return pieces


def _map(results, records) -> dict[str, Any]:
    try:
        from paligemma_xray.evaluate import evaluate_detections
    except ImportError:  # evaluation layer absent: loss and parse rate only
        return {}
    from paligemma_xray.locations import Detections

    classes = sorted({c for r in records for c in classes_from_prefix(r.prefix)})
    truths = [Detections.from_json(r[2]) for r in results]
    preds = [Detections.from_json(r[1]["pred"]) for r in results]
    figures = evaluate_detections(truths, preds, classes, bootstrap=0, curves=False)
    return {"map50": figures.get("map50"), "map50_95": figures.get("map50_95")}
