"""``paligemma-xray demo``: fine-tune the shipped base model to find fractures, on a CPU.

The same story as real use, at laptop scale: a pretrained PaliGemma (here the small base
model of :mod:`paligemma_xray.demo.base`, which can localise shapes but has never seen a
radiograph) is evaluated on synthetic fracture radiographs, fine-tuned on them with the
project's training engine, and evaluated again. Phases, each with its progress bar:

1. generate the synthetic fracture set (:func:`paligemma_xray.data.synth.generate`);
2. evaluate the base model on the test split ("before");
3. fine-tune (:func:`paligemma_xray.train.run`, recipe :data:`DEMO_RECIPE`);
4. evaluate the fine-tuned model ("after"), write the HTML report (before and after side by
   side, metrics, loss curve, gallery), the fine-tuned model as an HF folder and as a
   big_vision ``.npz``, and ``metrics.json`` with the headline figures of both.

Deterministic for a given seed: the data, the training order and the amount of training
depend only on the seed and ``--minutes`` (converted to a number of training examples at a
fixed nominal CPU rate, never by looking at the clock).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from paligemma_xray.errors import ConfigError

DEMO_RECIPE = "big-vision"
"""Training-engine preset the demo fine-tunes with (see :data:`DEMO_OVERRIDES` and docs/demo.md)."""

DEMO_OVERRIDES: dict[str, Any] = {}
"""Recipe fields the demo changes, with the reason in docs/demo.md."""

NOMINAL_EXAMPLES_PER_MINUTE = 8_000
"""Fine-tuning examples one minute buys on the reference 2-core CPU (big-vision, 1 thread:
measured 140 examples/s = 8400 per minute on the shared machine; see docs/demo.md).

A fixed figure rather than a clock, so that a seed and a budget always give the same run."""

OVERHEAD_MINUTES = 2.0
"""Budget of the phases other than training (data, two evaluations, report, saving)."""

HEADLINE_KEYS = (
    "map50",
    "map50_95",
    "precision",
    "recall",
    "f1",
    "n_images",
    "n_ground_truth",
    "n_predictions",
)
"""Metrics copied into ``<out>/metrics.json`` for each of before and after (plus the FROC
score, image-level sensitivity and specificity, and parse failures)."""


@dataclass
class DemoSettings:
    """Everything the demo depends on; written into ``metrics.json``."""

    seed: int = 0
    minutes: float = 10.0
    """Total time budget on the reference 2-core CPU; the training share sets the examples."""
    train_images: int = 800
    valid_images: int = 48
    test_images: int = 150
    image_size: int = 224
    """Side of the generated radiographs (the model sees them at its own 112 px)."""
    recipe: str = DEMO_RECIPE
    overrides: dict[str, Any] = field(default_factory=lambda: dict(DEMO_OVERRIDES))
    examples: int | None = None
    """Fine-tuning examples; ``None``: derived from ``minutes``."""
    threads: int | None = 1
    """CPU threads for torch (``None``: torch's default). One by default: measured on the
    shared 2-core machine, two threads fell from 140 to 12 examples/s when other work ran,
    and float sums (hence bit-exact results) depend on the thread count."""

    def training_examples(self, batch_size: int) -> int:
        """Examples to train on: given, or what the budget's training share buys."""
        if self.examples is not None:
            return max(batch_size, self.examples)
        train_minutes = self.minutes - OVERHEAD_MINUTES
        if train_minutes <= 0:
            raise ConfigError(
                f"--minutes {self.minutes} leaves no time to train (the other phases take about "
                f"{OVERHEAD_MINUTES} minutes)"
            )
        examples = int(train_minutes * NOMINAL_EXAMPLES_PER_MINUTE)
        return max(batch_size, examples - examples % batch_size)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures worth comparing across versions, from an evaluation's metrics."""
    found = {key: metrics.get(key) for key in HEADLINE_KEYS}
    found["froc_score"] = metrics.get("froc", {}).get("score")
    image_level = metrics.get("image_level", {})
    found["image_sensitivity"] = image_level.get("sensitivity")
    found["image_specificity"] = image_level.get("specificity")
    found["parse_failures"] = metrics.get("parse_failures", {}).get("total")
    found["ci95_map50"] = metrics.get("ci95", {}).get("map50")
    return found


def run_demo(
    out: str | Path,
    settings: DemoSettings | None = None,
    base: str | Path | None = None,
    progress: bool = True,
    bootstrap: int = 200,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; return what ``<out>/metrics.json`` holds.

    ``base``: the model to start from (default: the shipped base model). ``bootstrap``:
    resamples for the report's 95% intervals (0 turns them off).
    """
    from paligemma_xray.data import open_dataset
    from paligemma_xray.data.synth import generate
    from paligemma_xray.demo.base import shipped_base
    from paligemma_xray.evaluate.runner import evaluate
    from paligemma_xray.infer import Detector
    from paligemma_xray.model import load, save_hf, save_npz
    from paligemma_xray.report import write_report
    from paligemma_xray.train import resolve, run

    settings = settings or DemoSettings()
    if min(settings.train_images, settings.valid_images, settings.test_images) < 1:
        raise ConfigError("the demo needs at least one image in each of train, valid and test")
    # Checked before any work: a budget that leaves no time to train is a user mistake.
    recipe = resolve(settings.recipe, overrides={**settings.overrides})
    examples = settings.training_examples(recipe.batch_size)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = Path(base) if base is not None else shipped_base()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. data ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    generate(
        data_dir,
        n=settings.train_images + settings.valid_images + settings.test_images,
        seed=settings.seed,
        size=settings.image_size,
        splits=(
            ("train", settings.train_images),
            ("valid", settings.valid_images),
            ("test", settings.test_images),
        ),
        progress=progress,
    )
    dataset = open_dataset(data_dir)
    timings["data"] = time.perf_counter() - t0

    # 2. before -------------------------------------------------------------------------
    t0 = time.perf_counter()
    before_dir = out / "before"
    detector = Detector.load(base_path, device="cpu", dtype="float32")
    detector.model_id = "base (before fine-tuning)"
    before = evaluate(
        detector, dataset, "test", before_dir, bootstrap=bootstrap, seed=settings.seed, progress=progress
    )
    del detector
    timings["evaluate_before"] = time.perf_counter() - t0

    # 3. fine-tune ----------------------------------------------------------------------
    t0 = time.perf_counter()
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = resolve(
        settings.recipe,
        overrides={
            **settings.overrides,
            "model": str(base_path),
            "data": str(data_dir),
            "out": str(run_dir),
            "examples": examples,
            "seed": settings.seed,
            "device": "cpu",
            # One validation pass, at the end: the demo's budget goes to training.
            "eval_every": max(1, examples // recipe.batch_size),
            "progress": progress,
        },
    )
    summary = run(config)
    timings["train"] = time.perf_counter() - t0

    # 4. after, checkpoints, report ------------------------------------------------------
    t0 = time.perf_counter()
    after_dir = out / "after"
    model, processor = load(run_dir / "last", dtype="float32", progress=False)
    detector = Detector(model, processor, model_id="fine-tuned (after)")
    after = evaluate(
        detector, dataset, "test", after_dir, bootstrap=bootstrap, seed=settings.seed, progress=progress
    )
    timings["evaluate_after"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hf_dir = save_hf(model, processor, out / "model")
    npz_path = save_npz(model, out / "model.npz")
    # big_vision keeps the tokenizer beside the .npz under this name; model.load finds it.
    shutil.copyfile(hf_dir / "tokenizer.model", out / "paligemma_tokenizer.model")
    report = write_report(
        after_dir,
        out / "report.html",
        run_dir=run_dir,
        compare=before_dir,
        names=("after fine-tuning", "before (base model)"),
        title="paligemma-xray demo: synthetic fractures, before and after fine-tuning",
    )
    timings["save_and_report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    result = {
        "seed": settings.seed,
        "settings": asdict(settings),
        "base_model": str(base_path),
        "recipe": {"name": config.recipe, **{k: v for k, v in config.to_dict().items() if k in _RECIPE_KEYS}},
        "before": _headline(before),
        "after": _headline(after),
        "train": {
            "steps": summary.steps,
            "examples": examples,
            "final_loss": summary.final_loss,
            "examples_per_s": summary.examples_per_s,
        },
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "paths": {
            "report": str(report),
            "model_hf": str(hf_dir),
            "model_npz": str(npz_path),
            "data": str(data_dir),
            "run": str(run_dir),
            "before": str(before_dir),
            "after": str(after_dir),
        },
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# Recipe fields that describe the fine-tuning in metrics.json (the full config is in run/).
_RECIPE_KEYS = ("trainable", "optimizer", "lr", "schedule", "warmup", "batch_size", "examples", "loss")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_summary(result: dict[str, Any]) -> str:
    """The demo's closing lines: headline figures before and after, and where each output is."""
    before, after, paths = result["before"], result["after"], result["paths"]
    seconds, recipe = result["seconds"], result["recipe"]
    lines = [
        f"recipe {recipe['name']} ({recipe['trainable']}, {recipe['optimizer']} "
        f"lr {recipe['lr']}), {result['train']['examples']} examples, "
        f"{seconds['train'] / 60:.1f} min of {seconds['total'] / 60:.1f} min in all",
        f"{'':22}{'before':>10}{'after':>10}",
    ]
    for key, name in (
        ("map50", "mAP@0.5"),
        ("map50_95", "mAP@[.5:.95]"),
        ("precision", "precision@0.5"),
        ("recall", "recall@0.5"),
        ("froc_score", "FROC score"),
    ):
        lines.append(f"{name:22}{_fmt(before.get(key)):>10}{_fmt(after.get(key)):>10}")
    lines += [
        f"report:          {paths['report']}",
        f"model (HF):      {paths['model_hf']}",
        f"model (.npz):    {paths['model_npz']}",
        f"metrics:         {Path(paths['report']).parent / 'metrics.json'}",
    ]
    return "\n".join(lines)
