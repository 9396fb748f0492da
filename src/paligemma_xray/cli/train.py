"""``paligemma-xray train``: fine-tune a checkpoint on a data set (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paligemma_xray.cli.parser import say, verb

EXAMPLES = [
    "paligemma-xray train --model hf-model --data my-set --out runs/r1",
    "paligemma-xray train --resume runs/r1",
]


def train(args: argparse.Namespace) -> int:
    from paligemma_xray import train
    from paligemma_xray.report.live import write_progress
    from paligemma_xray.train.logs import last_record, read_metrics
    from paligemma_xray.train.run_folder import interrupted_message

    flags = {**train.recipes.overrides(args), "model": args.model, "data": args.data, "out": args.out}
    config = train.recipes.for_command(args.recipe, args.config, flags, resume=args.resume)
    try:
        summary = train.run(
            config, resume=args.resume is not None, overwrite=args.overwrite, on_validation=write_progress
        )
    except KeyboardInterrupt as stop:  # SIGINT or SIGTERM (train.Interrupted): saved, then stopped
        say(interrupted_message(Path(config.out)))
        return 143 if getattr(stop, "signal_name", "") == "SIGTERM" else 130
    best = (
        f"{summary.best_metric} {summary.best_value:.4f} at step {summary.best_step}"
        if (summary.best_value is not None)
        else "no evaluation"
    )
    final_loss = summary.final_loss
    if final_loss is None:  # a resume of a finished run trains no step: report its last loss
        final_loss = last_record(read_metrics(summary.run_dir, missing_ok=True), "train").get("loss")
    if final_loss is None:
        print(f"nothing to train: {summary.run_dir} has no train steps logged, best {best}")
        return 0
    stopped = " (early stop)" if summary.stopped_early else ""
    print(
        f"trained {summary.steps} steps{stopped} into {summary.run_dir}: final loss {final_loss:.4f}, "
        f"best {best}"
    )
    return 0


def register(verbs: Any) -> None:
    from paligemma_xray.train.recipes import PRESETS, add_flags, field_docs

    p = verb(
        verbs,
        "train",
        train,
        help="fine-tune a PaliGemma checkpoint on a data set (resumable)",
        description="Fine-tune MODEL on DATA into the run folder OUT: config.yaml (the resolved\n"
        "recipe), metrics.jsonl, tb/, checkpoints/step-N/, best/ (the trained weights\n"
        "only, over MODEL) and last/ (a full HF folder, frozen weights in MODEL's dtype).\n"
        "With no flags this is big_vision's recipe: attention weights only, SGD lr 0.01,\n"
        "cosine with 10% warm-up, batch 8, 512 examples, text length 128.\n"
        "Values: preset (--recipe) < --config YAML < flags. Several GPUs:\n"
        "  torchrun --nproc_per_node N -m paligemma_xray.cli train ...",
        examples=EXAMPLES,
    )
    docs = field_docs()  # the recipe's own fields, given as verb arguments
    p.add_argument("--model", metavar="M", help=docs["model"])
    p.add_argument("--data", metavar="D", help=docs["data"])
    p.add_argument("--out", metavar="RUN", help=docs["out"])
    p.add_argument(
        "--recipe",
        choices=list(PRESETS),
        default=None,
        help="preset to start from (default: big-vision, or the --config file's recipe:)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of recipe fields (applied over the preset)")
    p.add_argument(
        "--resume", metavar="RUN", help="continue the run in RUN exactly where its last checkpoint left it"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    add_flags(p)
