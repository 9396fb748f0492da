"""``paligemma-xray demo``: fine-tune the shipped base model to find fractures, on a CPU.

The same story as real use, at laptop scale: a pretrained PaliGemma (here the small base
model of :mod:`paligemma_xray.demo.base`, which can localise shapes but has never seen a
radiograph) is evaluated on synthetic fracture radiographs, fine-tuned on them with the
project's training engine, and evaluated again. Phases, each with its progress bar:

1. generate the synthetic fracture set (:func:`paligemma_xray.data.synth.generate`);
2. evaluate the base model on the test split ("before"), at the operating point (score
   threshold) that gives it the best F1 on the valid split;
3. fine-tune (:func:`paligemma_xray.train.run`, recipe :data:`DEMO_RECIPE`);
4. evaluate the fine-tuned model ("after") the same way, write the HTML report (before and
   after side by side, metrics, loss curve, gallery), the fine-tuned model as an HF folder
   and as a big_vision ``.npz``, and ``metrics.json`` with the headline figures of both.

Deterministic for a given seed: the data, the training order and the amount of training
depend only on the seed and ``--minutes`` (converted to a number of training examples at a
fixed nominal CPU rate, never by looking at the clock).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from paligemma_xray.errors import ConfigError
from paligemma_xray.model.forms import CALIBRATION_FILE, HF_TOKENIZER, LAST, NPZ_TOKENIZER

DEMO_RECIPE = "full"
"""Training-engine preset the demo fine-tunes with (see :data:`DEMO_OVERRIDES`).

Not the default ``big-vision`` (attention weights only, SGD): measured on the demo's data
with the shipped base and the demo's number of examples, big-vision reaches test mAP@0.5
0.03 and training the whole language model with the vision tower frozen
(``frozen-vision``) 0.05, against 0.69 here, because the base's vision tower, pretrained on
shapes, does not yet see fracture gaps; only a recipe that trains it too does (figures in
docs/demo.md). With PaliGemma's real 3B checkpoint, whose SigLIP tower has seen billions of
images, the attention-only recipe is the one to start from."""

DEMO_OVERRIDES: dict[str, Any] = {
    "lr": 1e-3,
    "batch_size": 32,
    "location_sigma": 8.0,
    "activation_checkpointing": False,
}
"""Recipe fields the demo changes (reasons in docs/demo.md): a learning rate for a model of
a few million parameters (the preset's 1e-5 is for 3B), a larger batch (faster per example
on a CPU, and at that rate batch 8 ended at mAP 0.00), smoothed location targets, and
no activation recomputation (memory is not short for a model this small)."""

NOMINAL_EXAMPLES_PER_MINUTE = 7_000
"""Fine-tuning examples one minute buys on the reference 2-core CPU with the demo's recipe
and 2 threads (measured 132 examples/s = 7900 per minute on an otherwise idle machine; see
docs/demo.md), rounded down for slower machines.

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
"""Metrics copied into ``<out>/metrics.json`` for each of before and after (plus the score
threshold, chosen on the valid split for the best F1, that precision, recall and the
image-level sensitivity and specificity are taken at; the FROC score; parse failures)."""


@dataclass
class DemoSettings:
    """Everything the demo depends on; written into ``metrics.json``."""

    seed: int = 0
    minutes: float = 10.0
    """Total time budget on the reference 2-core CPU; the training share sets the examples."""
    train_images: int = 2400
    valid_images: int = 48
    test_images: int = 150
    image_size: int = 224
    """Side of the generated radiographs (the model sees them at its own 112 px)."""
    recipe: str = DEMO_RECIPE
    overrides: dict[str, Any] = field(default_factory=lambda: dict(DEMO_OVERRIDES))
    min_box_probability: float | None = 0.05
    """Evaluation decodes candidates down to this box probability (see
    :class:`paligemma_xray.infer.Detector`), as detectors are evaluated: mAP ranks every
    candidate by its score instead of stopping at the greedy operating point. Both
    evaluations use it; ``None`` gives the greedy "box or stop" figures."""
    examples: int | None = None
    """Fine-tuning examples; ``None``: derived from ``minutes``."""
    threads: int | None = 2
    """CPU threads for torch (``None``: torch's default). Fixed rather than "all cores"
    because float sums, hence bit-exact results, depend on the thread count. Two suit the
    reference 2-core machine when the demo has it to itself (132 examples/s against 88 with
    one); on a busy machine one thread is faster (two fell to 12 examples/s there)."""

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


CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""The CPU kernel set the demo pins on x86 (torch's own kernels, MKL's and oneDNN's): the
same sums in the same order on every AVX2 machine, whether it also has AVX-512 or not.
Without it, one seed and one thread count still gave two figures on two machines (the
AVX-512 kernels add in another order; see docs/demo.md). Variables already set win."""


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return any(line.startswith("flags") and " avx2" in line for line in cpuinfo)
    except OSError:
        return False


@contextlib.contextmanager
def pinned_cpu_kernels() -> Iterator[None]:
    """Run the block with :data:`CPU_KERNELS` set (x86 with AVX2 only), then restore them.

    torch reads them at its first operation: in a process that has already computed, the
    kernels stay as they were (``metrics.json`` records the set actually used).
    """
    saved = {name: os.environ.get(name) for name in CPU_KERNELS}
    if _has_avx2():
        for name, value in CPU_KERNELS.items():
            os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, was in saved.items():
            if was is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = was


def runtime() -> dict[str, Any]:
    """What the demo's figures depend on besides its settings (written into ``metrics.json``)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ.get(name) for name in CPU_KERNELS},
    }


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures worth comparing across versions, from an evaluation's metrics."""
    found = {key: metrics.get(key) for key in HEADLINE_KEYS}
    found["threshold"] = metrics.get("threshold")
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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; return what ``<out>/metrics.json`` holds.

    ``base``: the model to start from (default: the shipped base model). ``bootstrap``:
    resamples for the report's 95% intervals (0 turns them off). A non-empty ``out`` (an
    earlier demo) is refused unless ``overwrite``; every file is written atomically.

    The figures are a function of the settings (seed, examples, threads), the torch version
    and the CPU kernel set, pinned to AVX2 on x86 (:func:`pinned_cpu_kernels`); the thread
    count and the kernels are restored afterwards. ``metrics.json`` records them (``runtime``).
    """
    previous_threads = torch.get_num_threads()
    try:
        with pinned_cpu_kernels():
            return _run_demo(out, settings, base, progress, bootstrap, overwrite)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    out: str | Path,
    settings: DemoSettings | None,
    base: str | Path | None,
    progress: bool,
    bootstrap: int,
    overwrite: bool,
) -> dict[str, Any]:
    from paligemma_xray import atomic
    from paligemma_xray.data import open_dataset
    from paligemma_xray.data.synth import generate
    from paligemma_xray.demo.base import shipped_base
    from paligemma_xray.errors import check_output
    from paligemma_xray.evaluate.runner import evaluate
    from paligemma_xray.evaluate.settings import EvaluateSettings
    from paligemma_xray.infer import Detector
    from paligemma_xray.model import load, save_hf, save_npz
    from paligemma_xray.model.forms import check_checkpoint
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
    # Inputs and output first: a wrong --base or a read-only folder must not cost minutes.
    out = check_output(out, folder=True)
    atomic.check_fresh(out, overwrite=overwrite, what="demo folder")
    base_path = (
        check_checkpoint(base)
        if base is not None and Path(base).exists()
        else (Path(base) if base is not None else shipped_base())
    )
    with atomic.disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
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
        overwrite=True,
    )
    dataset = open_dataset(data_dir)
    timings["data"] = time.perf_counter() - t0

    def assess(detector: Detector, name: str) -> dict[str, Any]:
        # The operating point (score threshold of precision, recall, image-level figures) and
        # the calibrated probabilities are chosen on the validation split (written to
        # OUT/NAME/valid/, the calibration to OUT/NAME/calibration.json), then the test split
        # is reported at it.
        evaluation = EvaluateSettings(
            data=str(dataset.root),
            split="test",
            out=str(out / name),
            operating_point="f1",
            bootstrap=bootstrap,
            seed=settings.seed,
            overwrite=True,
        )
        return evaluate(detector, evaluation, dataset=dataset, progress=progress)

    # 2. before -------------------------------------------------------------------------
    t0 = time.perf_counter()
    before_dir = out / "before"
    detector = Detector.load(
        base_path,
        device="cpu",
        dtype="float32",
        progress=progress,
        min_box_probability=settings.min_box_probability,
    )
    detector.model_id = "base (before fine-tuning)"
    before = assess(detector, "before")
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
            # Float32 whatever the CPU: the demo's figures are reproducible under its pinned
            # AVX2 kernels (CPU_KERNELS), where bfloat16 has no native units.
            "precision": "float32",
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
    model, processor = load(run_dir / LAST, dtype="float32", progress=False)
    detector = Detector(
        model, processor, model_id="fine-tuned (after)", min_box_probability=settings.min_box_probability
    )
    after = assess(detector, "after")
    timings["evaluate_after"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hf_dir = save_hf(model, processor, out / "model", progress=progress)
    npz_path = save_npz(model, out / "model.npz", progress=progress)
    # big_vision keeps the tokenizer beside the .npz under this name; model.load finds it.
    with atomic.staged_path(out / NPZ_TOKENIZER) as tmp:
        shutil.copyfile(hf_dir / HF_TOKENIZER, tmp)
    # The operating point and calibration go with both copies of the model, so that predict
    # and serve default to them: fitted on the model in memory, which both hold exactly.
    from paligemma_xray.infer.calibrated import Calibration, save_with_model

    fitted = Calibration.load(after_dir / CALIBRATION_FILE)
    save_with_model(fitted, hf_dir)
    save_with_model(fitted, npz_path)
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
        "runtime": runtime(),
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
    atomic.write_json(out / "metrics.json", result)
    return result


# Recipe fields that describe the fine-tuning in metrics.json (the full config is in run/).
_RECIPE_KEYS = ("trainable", "optimizer", "lr", "schedule", "warmup", "batch_size", "examples", "loss")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _threshold(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}"


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
        ("froc_score", "FROC score"),
        ("threshold", "score threshold¹"),  # printed with 3 significant digits
        ("precision", "precision¹"),
        ("recall", "recall¹"),
        ("image_sensitivity", "image sensitivity¹"),
        ("image_specificity", "image specificity¹"),
    ):
        show = _threshold if key == "threshold" else _fmt
        lines.append(f"{name:22}{show(before.get(key)):>10}{show(after.get(key)):>10}")
    lines.append("¹ boxes at IoU ≥ 0.5 scored ≥ the threshold, chosen for the best F1 on the valid split")
    lines += [
        f"report:          {paths['report']}",
        f"model (HF):      {paths['model_hf']}",
        f"model (.npz):    {paths['model_npz']}",
        f"metrics:         {Path(paths['report']).parent / 'metrics.json'}",
    ]
    return "\n".join(lines)
