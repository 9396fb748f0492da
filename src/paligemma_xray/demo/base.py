"""The demo's base model: a small PaliGemma pretrained by this project to localise shapes.

Real use starts from a pretrained PaliGemma that can already localise things; the demo
tells the same story at laptop scale. The base model is the real architecture
(``PaliGemmaForConditionalGeneration``: SigLIP vision tower, linear projector, Gemma
decoder), with the tiny SentencePiece tokenizer whose ``<loc>``/``<seg>`` pieces sit at the
end of the vocabulary as in the real one, and the real prompt format. It is pretrained on
:mod:`paligemma_xray.demo.shapes` (no fractures) through the project's own training engine
(:func:`paligemma_xray.train.run`), then stored as float16 safetensors in the package
(``paligemma_xray/assets/demo-base``).

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
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from paligemma_xray.errors import CheckpointError, ConfigError

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
class PretrainSettings:
    """Everything :func:`pretrain` depends on (besides the code); recorded beside the weights."""

    seed: int = 0
    """Seeds the shapes data set, the initial weights and the training order."""
    train_images: int = 30_000
    """Distinct training images generated (the run cycles through them)."""
    examples: int = 120_000
    """Training examples seen in total (7500 steps of 16, 4 passes over the images)."""
    batch_size: int = 16
    """Small batches: more optimiser steps for the same compute, which is what gets a
    from-scratch model past its first plateau (predicting the average box) sooner."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 0 after a 3% warm-up)."""
    warmup: float = 0.03
    grad_clip: float = 1.0
    evaluations: int = 6
    """Validation passes during the run (loss and decoded mAP on 128 shapes images)."""
    threads: int = 1
    """CPU threads; float32 sums depend on the thread count, so it is part of the recipe."""


def shipped_base() -> Path:
    """Folder of the base model shipped inside the package (an HF folder ``model.load`` reads)."""
    path = Path(str(resources.files("paligemma_xray") / "assets" / "demo-base"))
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            "the demo base model is missing from the package; rebuild it with "
            "`paligemma-xray demo pretrain --out src/paligemma_xray/assets/demo-base`",
            path=path,
        )
    return path


def initial_model(seed: int = 0):
    """The untrained base model and its processor, with the structured initialisation."""
    from paligemma_xray.model.tiny import tiny_model

    model, processor = tiny_model(version=1, seed=seed, **BASE_SIZES)
    first_loc = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[first_loc : first_loc + 1024] = _loc_embeddings(embedding.shape[1], std=0.02)
        positions = model.model.vision_tower.embeddings.position_embedding.weight
        positions.copy_(_sincos_2d(positions.shape[0], positions.shape[1]))
    return model, processor


def _loc_embeddings(width: int, std: float) -> torch.Tensor:
    """(1024, width) sinusoids of the bin index, 1 to 100 periods over the range, scaled to ``std``.

    Logits through the tied head are then smooth functions of the bin: a hidden state that
    matches the features of bin k scores k's neighbours almost as high, the prior a
    coordinate deserves (independent random rows know nothing of the order of the bins).
    """
    bins = torch.arange(1024, dtype=torch.float64)[:, None] / 1023
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
    initialised model (:func:`initial_model`), train it with the engine's ``full`` recipe
    (every weight, AdamW; flips, jitter and object shuffling off because the shapes set has
    a fixed reading order and infinite variety already), cast to float16 and save with
    ``model.save_hf``. ``work`` keeps the data and the run folder (loss curve in
    ``run/metrics.jsonl``); by default a temporary folder that is deleted afterwards.
    """
    from paligemma_xray.demo import shapes
    from paligemma_xray.model import load, save_hf
    from paligemma_xray.model.checkpoints import cast
    from paligemma_xray.train import resolve, run

    settings = settings or PretrainSettings()
    if settings.examples < settings.batch_size or settings.train_images < 1:
        raise ConfigError("pretrain needs at least one batch of examples and one training image")
    out = Path(out)
    keep_work = work is not None
    work_dir = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="demo-pretrain-"))
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    try:
        data = shapes.generate(work_dir / "shapes", settings.train_images, settings.seed, progress=progress)
        model, processor = initial_model(settings.seed)
        init_dir = save_hf(model, processor, work_dir / "init")
        steps = settings.examples // settings.batch_size
        config = resolve(
            "full",
            overrides={
                "model": str(init_dir),
                "data": str(data),
                "out": str(work_dir / "run"),
                "examples": settings.examples,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "warmup": settings.warmup,
                "grad_clip": settings.grad_clip,
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
        trained, processor = load(work_dir / "run" / "last", dtype="float32", progress=False)
        final_eval = _last_eval(work_dir / "run" / "metrics.jsonl")
        cast(trained, "float16")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(trained, processor, tmp)
        size = (tmp / "model.safetensors").stat().st_size
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
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return result
    finally:
        if not keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)


def _last_eval(metrics_path: Path) -> dict:
    """The last ``"kind": "eval"`` record of a run's metrics.jsonl (empty if none)."""
    last: dict = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval":
                last = record
    return last
