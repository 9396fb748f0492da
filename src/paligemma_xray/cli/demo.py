"""``paligemma-xray demo`` (and ``demo pretrain``): the embedded demo and its base model."""

from __future__ import annotations

import argparse
from typing import Any

from paligemma_xray.cli.parser import verb

EXAMPLES = ["paligemma-xray demo --out demo-out", "paligemma-xray demo --minutes 2 --out quick-demo"]
PRETRAIN_EXAMPLES = ["paligemma-xray demo pretrain --out my-base"]


def cmd_demo(args: argparse.Namespace) -> int:
    from paligemma_xray.demo import DemoSettings, format_summary, run_demo

    settings = DemoSettings(seed=args.seed, minutes=args.minutes, threads=args.threads)
    if args.images is not None:
        settings.train_images = args.images
    result = run_demo(args.out, settings, base=args.base, overwrite=args.overwrite)
    print(format_summary(result))
    return 0


def cmd_demo_pretrain(args: argparse.Namespace) -> int:
    from paligemma_xray.demo import PretrainSettings, pretrain

    settings = PretrainSettings(seed=args.seed, threads=args.threads)
    if args.examples is not None:
        settings.examples = args.examples
    if args.images is not None:
        settings.train_images = args.images
    summary = pretrain(args.out, settings, work=args.work)
    minutes = summary.seconds / 60
    print(f"base model: {summary.out} ({summary.bytes / 1e6:.2f} MB float16) in {minutes:.1f} min")
    print(f"validation (shapes): {summary.valid}")
    return 0


def register(verbs: Any) -> None:
    p = verb(
        verbs,
        "demo",
        cmd_demo,
        help="fine-tune the shipped small base model to find synthetic fractures (CPU, ~10 min)",
        description="Generate a synthetic fracture set, evaluate the shipped base model (pretrained\n"
        "on shapes, never on radiographs) on its test split, fine-tune it with the\n"
        "training engine, evaluate again, and write OUT/report.html (before and after),\n"
        "OUT/model/ (HF) and OUT/model.npz (big_vision), and OUT/metrics.json.\n"
        "No network. Deterministic for a given --seed and --minutes.\n\n"
        "  paligemma-xray demo pretrain --out DIR   rebuilds the base model (see --help).",
        examples=EXAMPLES,
    )
    from paligemma_xray.demo.run import DemoSettings

    demo_defaults = DemoSettings()
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: ./demo-out)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in DIR")
    p.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        metavar="N",
        help="time budget on a 2-core CPU; sets how many examples are trained on, at a fixed\n"
        "nominal rate (not by the clock, so runs repeat exactly) (default: 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training order (default: 0)")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help=f"training images to generate (default: {demo_defaults.train_images})",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="PATH",
        help="model to start from (default: the base model shipped in the package)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=demo_defaults.threads,
        metavar="N",
        help=f"CPU threads for torch (default: {demo_defaults.threads}, for a 2-core machine\n"
        "the demo has to itself; use 1 on a busy one, where 2 threads ran 10x slower).\n"
        "Float sums, hence results, depend on the thread count",
    )
    from paligemma_xray.demo.base import PretrainSettings

    defaults = PretrainSettings()
    sub = p.add_subparsers(title="demo verbs (optional)", metavar="[pretrain]")
    q = verb(
        sub,
        "pretrain",
        cmd_demo_pretrain,
        help="rebuild the demo's base model: pretrain on synthetic shapes (about 35 min, 1 CPU core)",
        description="Pretrain the demo's small PaliGemma (the real architecture and tokenizer layout)\n"
        "on synthetic shapes ('detect circle', 'detect ring ; line', ...): stage 1 warms\n"
        "up the vision tower with a dense per-patch objective, stage 2 trains the decoder\n"
        "on detection text through the training engine. Writes OUT as float16\n"
        "safetensors with its tokenizer and config. The shipped base model is exactly:\n"
        "  paligemma-xray demo pretrain --out src/paligemma_xray/assets/demo-base\n"
        "Deterministic for a given seed, torch version and thread count.",
        examples=PRETRAIN_EXAMPLES,
    )
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write the base model to (replaced)")
    q.add_argument("--seed", type=int, default=0, help="seed of data, initial weights and order (default: 0)")
    q.add_argument(
        "--examples",
        type=int,
        default=None,
        metavar="N",
        help=f"stage-2 training examples in total (default: {defaults.examples})",
    )
    q.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help=f"distinct training images generated (default: {defaults.train_images})",
    )
    q.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads; part of the recipe, float32 sums depend on it (default: 1)",
    )
    q.add_argument(
        "--work",
        default=None,
        metavar="DIR",
        help="keep the shapes data and the training run here (default: a temporary folder)",
    )
