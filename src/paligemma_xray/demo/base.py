"""The demo's base model: a small PaliGemma pretrained by this project to localise shapes.

Real use starts from a pretrained PaliGemma that can already localise things; the demo
tells the same story at laptop scale. The base model is the real architecture
(``PaliGemmaForConditionalGeneration``: SigLIP vision tower, linear projector, Gemma
decoder), with the tiny SentencePiece tokenizer whose ``<loc>``/``<seg>`` pieces sit at the
end of the vocabulary as in the real one, and the real prompt format. It is pretrained on
:mod:`paligemma_xray.demo.shapes` (no fractures) in two stages, then stored as float16
safetensors in the package (``paligemma_xray/assets/demo-base``):

1. **Vision warm-up** (:func:`warm_up_vision`): the vision tower and projector alone, with a
   dense objective on every image token (which shape, if any, covers this patch, and the
   box of that shape as a distribution over the 1024 ``<loc>`` bins, scored through the
   model's own ``<loc>`` embeddings). 64 supervised tokens per image instead of four
   location tokens per object: measured, a from-scratch model trained end to end on text
   spent thousands of steps image-blind (docs/demo.md), while this stage gets the image
   tokens to encode *what is where* in a few minutes. Its two small heads are discarded.
2. **Detection** (:func:`paligemma_xray.train.run`, the engine's ``frozen-vision`` recipe):
   the decoder on ``detect …`` prompts and ``<loc>`` answers, the real PaliGemma task, with
   the warmed-up image tokens fixed. Measured: training the vision tower too (``full``)
   lets the random decoder's early gradients undo stage 1 (validation loss 3.04 against
   2.71 after 900 steps, docs/demo.md).

Two initialisation choices (ordinary, documented initialisations; everything is trained
afterwards) give the decoder structure to start from:

- the 1024 ``<loc>`` embeddings start as sinusoids of their bin index, so that neighbouring
  bins start similar and the tied output head scores nearby bins alike;
- the vision tower's position embeddings start as 2D sine-cosine features of the patch
  centre (as in ViT variants with fixed embeddings), coordinates the decoder can read off
  the patches it attends to.

Their effect on the speed of learning was not established (docs/demo.md has the figures).

``paligemma-xray demo pretrain --out DIR`` reruns exactly this (:func:`pretrain`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from paligemma_xray.errors import CheckpointError, ConfigError, check_output
from paligemma_xray.locations import LOC_BINS
from paligemma_xray.model.forms import HF_WEIGHTS, LAST

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

BASE_SIZES: dict[str, int] = {
    "image_size": 112,  # 8×8 = 64 image tokens of 14-px patches: fast on a CPU
    "patch_size": 14,
    "width": 128,
    "depth": 3,
    "heads": 4,
    "kv_heads": 1,  # multi-query attention, as in PaliGemma 1 (Gemma 2B)
    "head_dim": 32,
    "mlp_dim": 512,
    "vision_width": 128,
    "vision_depth": 3,
    "vision_heads": 4,
    "vision_mlp_dim": 512,
}
"""Sizes of the base model (``paligemma_xray.model.tiny.tiny_dims`` keywords); PaliGemma 1."""

MAX_BYTES = 5 * 1024 * 1024
"""Largest size the shipped weights may have."""


@dataclass
class WarmupSettings:
    """Stage 1 (:func:`warm_up_vision`): vision tower and projector, dense objective."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay after a 5% warm-up)."""
    images: int = 16_000
    """Training images used (the first ones of the shapes set; held in memory as float16)."""
    location_sigma: float = 8.0
    """Width in bins of the Gaussian target around each box coordinate."""


@dataclass
class PretrainSettings:
    """Everything :func:`pretrain` depends on (besides the code); recorded beside the weights."""

    seed: int = 0
    """Seeds the shapes data set, the initial weights and the training order."""
    train_images: int = 30_000
    """Distinct training images generated (the run cycles through them)."""
    examples: int = 160_000
    """Stage-2 training examples seen in total (10 000 steps of 16, about 5 passes)."""
    batch_size: int = 16
    """Small batches: more optimiser steps for the same compute, which is what gets a
    from-scratch model past its first plateau (predicting the average box) sooner."""
    lr: float = 1e-3
    """Stage 2's peak AdamW learning rate (cosine decay to 0 after a 3% warm-up)."""
    warmup: float = 0.03
    grad_clip: float = 1.0
    evaluations: int = 6
    """Validation passes during the run (loss and decoded mAP on 128 shapes images)."""
    threads: int = 1
    """CPU threads; float32 sums depend on the thread count, so it is part of the recipe."""
    location_sigma: float = 8.0
    """Stage 2's ``location_sigma`` (train.recipes): near misses cost less than far ones."""
    loss: str = "token"
    """Stage 2's loss reduction: ``token`` weighs every answer token alike, so an empty
    answer (one EOS) does not weigh as much as a whole box (docs/demo.md)."""
    warmup_stage: WarmupSettings = field(default_factory=WarmupSettings)
    """Stage 1; ``steps = 0`` skips it."""


def shipped_base() -> Path:
    """Folder of the base model shipped inside the package (an HF folder ``model.load`` reads)."""
    path = Path(str(resources.files("paligemma_xray") / "assets" / "demo-base"))
    if not (path / HF_WEIGHTS).is_file():
        raise CheckpointError(
            "the demo base model is missing from the package; rebuild it with "
            "`paligemma-xray demo pretrain --out src/paligemma_xray/assets/demo-base`",
            path=path,
        )
    return path


def initial_model(seed: int = 0) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The untrained base model and its processor, with the structured initialisation."""
    from paligemma_xray.model.tiny import tiny_model

    model, processor = tiny_model(version=1, seed=seed, **BASE_SIZES)
    first_loc = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    text_table = model.get_input_embeddings()
    image_table = model.get_submodule("model.vision_tower.embeddings.position_embedding")
    assert isinstance(text_table, nn.Embedding) and isinstance(image_table, nn.Embedding)
    with torch.no_grad():
        embedding = text_table.weight
        embedding[first_loc : first_loc + LOC_BINS] = _loc_embeddings(embedding.shape[1], std=0.02)
        positions = image_table.weight
        positions.copy_(_sincos_2d(positions.shape[0], positions.shape[1]))
    return model, processor


def _loc_embeddings(width: int, std: float) -> torch.Tensor:
    """(1024, width) sinusoids of the bin index, 1 to 100 periods over the range, scaled to ``std``.

    Logits through the tied head are then smooth functions of the bin: a hidden state that
    matches the features of bin k scores k's neighbours almost as high, the prior a
    coordinate deserves (independent random rows know nothing of the order of the bins).
    """
    bins = torch.arange(LOC_BINS, dtype=torch.float64)[:, None] / (LOC_BINS - 1)
    freqs = torch.logspace(0, 2, width // 2, dtype=torch.float64)[None, :]
    phase = 2 * math.pi * bins * freqs
    features = torch.cat([torch.sin(phase), torch.cos(phase)], dim=1) * std * math.sqrt(2)
    return features.to(torch.float32)


def _sincos_2d(tokens: int, width: int) -> torch.Tensor:
    """(tokens, width) 2D sine-cosine position features of a square grid of patches."""
    side = round(math.sqrt(tokens))
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    quarter = width // 4
    freqs = torch.logspace(0, 2, quarter, dtype=torch.float64)[None, :]
    y, x = yy.reshape(-1, 1), xx.reshape(-1, 1)
    parts = [f(2 * math.pi * v * freqs) for v in (y, x) for f in (torch.sin, torch.cos)]
    features = torch.zeros(tokens, width, dtype=torch.float64)
    features[:, : 4 * quarter] = torch.cat(parts, dim=1)
    return features.to(torch.float32)


@dataclass
class PretrainSummary:
    """What :func:`pretrain` returns (also written as ``pretrain.json`` beside the weights)."""

    out: str
    seconds: float
    settings: dict
    final_loss: float | None
    valid: dict
    bytes: int


def pretrain(
    out: str | Path,
    settings: PretrainSettings | None = None,
    work: str | Path | None = None,
    progress: bool = True,
) -> PretrainSummary:
    """Pretrain the demo base model on shapes and write it to ``out`` (float16 HF folder).

    Steps: generate the shapes set (:func:`paligemma_xray.demo.shapes.generate`), write the
    initialised model (:func:`initial_model`), warm up its vision side
    (:func:`warm_up_vision`), train the decoder with the engine's ``frozen-vision`` recipe
    (the decoder, AdamW; flips, jitter and object shuffling off because the shapes set has
    a fixed reading order and infinite variety already), cast to float16 and save with
    ``model.save_hf``. ``work`` keeps the data and the run folder (loss curve in
    ``run/metrics.jsonl``); by default a temporary folder that is deleted afterwards.
    """
    from paligemma_xray.demo import shapes
    from paligemma_xray.model import load, save_hf
    from paligemma_xray.model.loading import cast
    from paligemma_xray.train import resolve, run
    from paligemma_xray.train.logs import last_record, read_metrics

    settings = settings or PretrainSettings()
    if settings.examples < settings.batch_size or settings.train_images < 1:
        raise ConfigError("pretrain needs at least one batch of examples and one training image")
    out = check_output(out, folder=True)  # a read-only folder: one line now, not after 35 minutes
    keep_work = work is not None
    work_dir = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="demo-pretrain-"))
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    try:
        data = shapes.generate(work_dir / "shapes", settings.train_images, settings.seed, progress=progress)
        model, processor = initial_model(settings.seed)
        warm_up_vision(model, processor, settings.warmup_stage, settings.seed, progress=progress)
        init_dir = save_hf(model, processor, work_dir / "init")
        steps = settings.examples // settings.batch_size
        config = resolve(
            "frozen-vision",
            overrides={
                "model": str(init_dir),
                "data": str(data),
                "out": str(work_dir / "run"),
                "examples": settings.examples,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "warmup": settings.warmup,
                "grad_clip": settings.grad_clip,
                "location_sigma": settings.location_sigma,
                "loss": settings.loss,
                "schedule": "cosine",
                "shuffle_objects": False,
                "hflip": 0.0,
                "jitter": 0.0,
                "activation_checkpointing": False,
                "max_length": 64,
                "eval_every": max(1, steps // settings.evaluations),
                "eval_batch_size": 32,
                "eval_max_new_tokens": 32,
                "keep_last": 1,
                "seed": settings.seed,
                "device": "cpu",
                "progress": progress,
            },
        )
        summary = run(config)
        trained, processor = load(work_dir / "run" / LAST, dtype="float32", progress=False)
        final_eval = last_record(read_metrics(work_dir / "run"), "eval")
        cast(trained, "float16")
        from paligemma_xray import atomic

        with atomic.staged_dir(out) as tmp:  # replaces `out` only once complete
            save_hf(trained, processor, tmp)
            size = (tmp / HF_WEIGHTS).stat().st_size
            if size > MAX_BYTES:
                raise ConfigError(f"the base model takes {size} bytes, more than the {MAX_BYTES} allowed")
            result = PretrainSummary(
                out=str(out),
                seconds=time.perf_counter() - started,
                settings=asdict(settings),
                final_loss=summary.final_loss,
                valid=final_eval,
                bytes=size,
            )
            (tmp / "pretrain.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result
    finally:
        if not keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)


def patch_targets(
    scene: list[tuple[str, tuple[float, float, float, float]]], image_size: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets of one shapes image for :func:`warm_up_vision`.

    Returns ``(classes (grid²,) int64, boxes (grid², 4) float32)``: for each patch (row-major,
    the order of the image tokens) the index in ``shapes.CLASSES`` of the object covering
    its centre (``len(CLASSES)`` = background), and that object's box as fractional bins
    ``y1 x1 y2 x2`` in [0, 1023], the order of PaliGemma's ``<loc>`` tokens. An object too
    small to cover a patch centre claims the patch holding its own centre; where objects
    overlap the smaller one wins (as in FCOS).
    """
    from paligemma_xray.demo.shapes import CLASSES

    patch = image_size / grid
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * patch
    classes = torch.full((grid * grid,), len(CLASSES), dtype=torch.int64)
    boxes = torch.zeros(grid * grid, 4, dtype=torch.float32)
    claimed_area = torch.full((grid * grid,), math.inf, dtype=torch.float64)
    for kind, (x1, y1, x2, y2) in scene:
        rows = ((centres >= y1) & (centres <= y2)).nonzero().flatten()
        cols = ((centres >= x1) & (centres <= x2)).nonzero().flatten()
        cells = (rows[:, None] * grid + cols[None, :]).flatten()
        if cells.numel() == 0:
            row = min(grid - 1, int((y1 + y2) / 2 // patch))
            col = min(grid - 1, int((x1 + x2) / 2 // patch))
            cells = torch.tensor([row * grid + col])
        area = (x2 - x1) * (y2 - y1)
        cells = cells[claimed_area[cells] > area]
        claimed_area[cells] = area
        classes[cells] = CLASSES.index(kind)
        boxes[cells] = torch.tensor([y1, x1, y2, x2], dtype=torch.float32) / image_size * 1023
    return classes, boxes


def warm_up_vision(model, processor, settings: WarmupSettings, seed: int, progress: bool = True) -> None:
    """Stage 1 of :func:`pretrain`: train the vision tower and projector densely, in place.

    Every image token (after the projector, as the decoder receives it) is scored by two
    linear heads that exist only here: a classifier over the shapes classes + background,
    and, on tokens covering an object, four maps into the space of the model's own
    ``<loc>`` embeddings whose dot products with the 1024 rows score the box's ``y1 x1 y2
    x2`` (cross-entropy against a Gaussian of ``location_sigma`` bins). The ``<loc>``
    embeddings train with them; the rest of the decoder is untouched. Deterministic for a
    given seed and thread count.
    """
    from paligemma_xray.demo.shapes import CLASSES, make_example
    from paligemma_xray.model.processing import image_resolution, preprocess_images
    from paligemma_xray.progress import bar as progress_bar
    from paligemma_xray.train.loss import location_distribution

    if settings.steps <= 0:
        return
    resolution = image_resolution(processor)
    grid = resolution // model.config.vision_config.patch_size
    first_loc = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    width = model.config.text_config.hidden_size

    pixels, classes, boxes = [], [], []
    for start in range(0, settings.images, 500):
        stop = min(settings.images, start + 500)
        examples = [make_example(seed, i, resolution) for i in range(start, stop)]
        pixels.append(preprocess_images([e.image for e in examples], resolution).to(torch.float16))
        for example in examples:
            c, b = patch_targets(example.scene, resolution, grid)
            classes.append(c)
            boxes.append(b)
    pixels_all, classes_all, boxes_all = torch.cat(pixels), torch.stack(classes), torch.stack(boxes)

    torch.manual_seed(seed)
    class_head = torch.nn.Linear(width, len(CLASSES) + 1)
    box_head = torch.nn.Linear(width, 4 * width)
    embeddings = model.get_input_embeddings().weight
    trained = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*trained, embeddings]:
        p.requires_grad_(True)
    params = [*trained, embeddings, *class_head.parameters(), *box_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warm = max(1, int(0.05 * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / settings.steps))),
    )
    order = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress_bar(range(settings.steps), desc="pretrain 1/2 vision", unit="step", enabled=progress)
    for _ in bar:
        pick = torch.randint(0, len(pixels_all), (settings.batch_size,), generator=order)
        tokens = model.model.get_image_features(pixels_all[pick].float()).pooler_output.reshape(-1, width)
        target_classes, target_boxes = classes_all[pick].reshape(-1), boxes_all[pick].reshape(-1, 4)
        class_loss = torch.nn.functional.cross_entropy(class_head(tokens), target_classes)
        on_object = target_classes < len(CLASSES)
        loc_rows = embeddings[first_loc : first_loc + LOC_BINS]
        box_logits = box_head(tokens[on_object]).reshape(-1, 4, width) @ loc_rows.T
        target = location_distribution(target_boxes[on_object], settings.location_sigma)
        box_loss = -(target * torch.log_softmax(box_logits, -1)).sum(-1).mean() if on_object.any() else 0.0
        loss = class_loss + box_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    bar.close()
    for p, flag in was_trainable.items():
        p.requires_grad_(flag)
        p.grad = None
