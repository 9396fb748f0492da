"""``paligemma-xray demo`` (and ``demo pretrain``): the embedded demo and its base model."""

from __future__ import annotations

import argparse
from typing import Annotated, Any

from pydantic.dataclasses import dataclass

from paligemma_xray.cli.parser import verb
from paligemma_xray.settings import SETTINGS_CONFIG, Float, flag

EXAMPLES = ["paligemma-xray demo --out demo-out", "paligemma-xray demo --minutes 2 --out quick-demo"]
PRETRAIN_EXAMPLES = ["paligemma-xray demo pretrain --out my-base"]


@dataclass(config=SETTINGS_CONFIG)
class DemoVerbSettings:
    """``demo``: what the command line sets of :class:`paligemma_xray.demo.DemoSettings`, and where."""

    out: Annotated[str, flag(metavar="DIR")] = "demo-out"
    """Output folder."""
    overwrite: bool = False
    """Replace an earlier demo in DIR."""
    minutes: Annotated[Float, flag(metavar="N")] = 10.0
    """Time budget on a 2-core CPU; sets how many examples are trained on, at a fixed nominal
    rate (not by the clock, so runs repeat exactly)."""
    seed: int = 0
    """Seed of the data and the training order."""
    images: Annotated[int | None, flag(metavar="N")] = None
    """Training images to generate (default: the demo's own)."""
    base: Annotated[str | None, flag(metavar="PATH")] = None
    """Model to start from (default: the base model shipped in the package)."""
    threads: Annotated[int | None, flag(metavar="N")] = None
    """CPU threads for torch (default: the demo's own, for a 2-core machine the demo has to
    itself; use 1 on a busy one, where 2 threads ran 10x slower). Float sums, hence results,
    depend on the thread count."""


@dataclass(config=SETTINGS_CONFIG)
class PretrainVerbSettings:
    """``demo pretrain``: what the command line sets of :class:`paligemma_xray.demo.PretrainSettings`."""

    out: Annotated[str, flag(metavar="DIR", required=True)] = ""
    """Folder to write the base model to (replaced)."""
    seed: int = 0
    """Seed of data, initial weights and order."""
    examples: Annotated[int | None, flag(metavar="N")] = None
    """Stage-2 training examples in total (default: the recipe's own)."""
    images: Annotated[int | None, flag(metavar="N")] = None
    """Distinct training images generated (default: the recipe's own)."""
    threads: Annotated[int, flag(metavar="N")] = 1
    """CPU threads; part of the recipe, float32 sums depend on it."""
    work: Annotated[str | None, flag(metavar="DIR")] = None
    """Keep the shapes data and the training run here (default: a temporary folder)."""


def demo(given: DemoVerbSettings) -> int:
    from paligemma_xray.demo import DemoSettings, format_summary, run_demo

    settings = DemoSettings(seed=given.seed, minutes=given.minutes)
    if given.threads is not None:
        settings.threads = given.threads
    if given.images is not None:
        settings.train_images = given.images
    result = run_demo(given.out, settings, base=given.base, overwrite=given.overwrite)
    print(format_summary(result))
    return 0


def pretrain(given: PretrainVerbSettings) -> int:
    from paligemma_xray.demo import PretrainSettings, pretrain

    settings = PretrainSettings(seed=given.seed, threads=given.threads)
    if given.examples is not None:
        settings.examples = given.examples
    if given.images is not None:
        settings.train_images = given.images
    summary = pretrain(given.out, settings, work=given.work)
    minutes = summary.seconds / 60
    print(f"base model: {summary.out} ({summary.bytes / 1e6:.2f} MB float16) in {minutes:.1f} min")
    print(f"validation (shapes): {summary.valid}")
    return 0


def _say_default(parser: argparse.ArgumentParser, dest: str, value: object) -> None:
    """Put the library's own default into a flag's help (``(default: the demo's own)`` → the number)."""
    for action in parser._actions:
        if action.dest == dest and action.help:
            action.help = action.help.replace("the demo's own", f"{value}").replace(
                "the recipe's own", f"{value}"
            )


def register(verbs: Any) -> None:
    from paligemma_xray.demo.base import PretrainSettings
    from paligemma_xray.demo.run import DemoSettings

    p = verb(
        verbs,
        "demo",
        demo,
        help="fine-tune the shipped small base model to find synthetic fractures (CPU, ~10 min)",
        description="Generate a synthetic fracture set, evaluate the shipped base model (pretrained\n"
        "on shapes, never on radiographs) on its test split, fine-tune it with the\n"
        "training engine, evaluate again, and write OUT/report.html (before and after),\n"
        "OUT/model/ (HF) and OUT/model.npz (big_vision), and OUT/metrics.json.\n"
        "No network. Deterministic for a given --seed and --minutes.\n\n"
        "  paligemma-xray demo pretrain --out DIR   rebuilds the base model (see --help).",
        examples=EXAMPLES,
        settings=DemoVerbSettings,
    )
    defaults = DemoSettings()
    _say_default(p, "images", defaults.train_images)
    _say_default(p, "threads", defaults.threads)
    sub = p.add_subparsers(title="demo verbs (optional)", metavar="[pretrain]")
    q = verb(
        sub,
        "pretrain",
        pretrain,
        help="rebuild the demo's base model: pretrain on synthetic shapes (about 35 min, 1 CPU core)",
        description="Pretrain the demo's small PaliGemma (the real architecture and tokenizer layout)\n"
        "on synthetic shapes ('detect circle', 'detect ring ; line', ...): stage 1 warms\n"
        "up the vision tower with a dense per-patch objective, stage 2 trains the decoder\n"
        "on detection text through the training engine. Writes OUT as float16\n"
        "safetensors with its tokenizer and config. The shipped base model is exactly:\n"
        "  paligemma-xray demo pretrain --out src/paligemma_xray/assets/demo-base\n"
        "Deterministic for a given seed, torch version and thread count.",
        examples=PRETRAIN_EXAMPLES,
        settings=PretrainVerbSettings,
    )
    pretrain_defaults = PretrainSettings()
    _say_default(q, "examples", pretrain_defaults.examples)
    _say_default(q, "images", pretrain_defaults.train_images)
