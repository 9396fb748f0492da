"""Training on suffixes that carry ``<seg>`` codes (Roboflow exports of segmentation projects).

Each ``<segNNN>`` is one token, its id a label of the loss like any other suffix token; the
location smoothing leaves segmentation targets one-hot; a segmentation example is never
mirrored (its codes describe the unmirrored mask).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from paligemma_xray.locations import seg_token
from paligemma_xray.model.processing import build_batch
from paligemma_xray.model.tiny import tiny_model
from paligemma_xray.train.batches import mirror_suffix
from paligemma_xray.train.loss import suffix_loss

CODES = [5, 127, 0, 64, 3, 9, 100, 77, 12, 12, 45, 90, 1, 2, 126, 33]
SEG_SUFFIX = "<loc0100><loc0200><loc0300><loc0400>" + "".join(seg_token(c) for c in CODES) + " fracture"


def test_seg_codes_are_single_tokens_and_loss_labels() -> None:
    _, processor = tiny_model(version=1, seed=0)
    tokenizer = processor.tokenizer
    seg0 = tokenizer.convert_tokens_to_ids("<seg000>")
    loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
    batch = build_batch(processor, [Image.new("RGB", (32, 32))], ["segment fracture"], [SEG_SUFFIX])
    labels = batch["labels"][0]
    targets = labels[labels != -100].tolist()
    label_ids = tokenizer(" fracture", add_special_tokens=False)["input_ids"]
    expected = [loc0 + b for b in (100, 200, 300, 400)] + [seg0 + c for c in CODES] + label_ids
    assert targets[: len(expected)] == expected
    assert targets[len(expected) :] == [tokenizer.eos_token_id]


def test_loss_over_seg_targets_is_plain_cross_entropy_also_with_location_smoothing() -> None:
    torch.manual_seed(0)
    model, processor = tiny_model(version=1, seed=0)
    tokenizer = processor.tokenizer
    seg0 = tokenizer.convert_tokens_to_ids("<seg000>")
    loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
    image = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    batch = build_batch(processor, [image], ["segment fracture"], [SEG_SUFFIX])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()[:, :-1]
        labels = batch["labels"][:, 1:]
        naive = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        naive_nll = naive[mask]
        smoothed = suffix_loss(model, batch, location_sigma=2.0, first_location_id=loc0)
        plain = suffix_loss(model, batch)
    targets = labels[mask]
    is_seg = (targets >= seg0) & (targets < seg0 + 128)
    assert int(is_seg.sum()) == 16
    torch.testing.assert_close(plain.token_nll, naive_nll, rtol=1e-4, atol=1e-4)
    # Smoothing changes the location targets' loss, never the segmentation ones'.
    torch.testing.assert_close(smoothed.token_nll[is_seg], naive_nll[is_seg], rtol=1e-4, atol=1e-4)
    assert torch.isclose(plain.loss, naive_nll.mean(), rtol=1e-4)


def test_a_segmentation_example_is_not_mirrored() -> None:
    assert mirror_suffix(SEG_SUFFIX) is None
    assert mirror_suffix("<loc0100><loc0200><loc0300><loc0400> fracture") is not None
