"""``paligemma-xray report EVAL_DIR``: the self-contained HTML report of an evaluation."""

from __future__ import annotations

import argparse
from typing import Any

from paligemma_xray.cli.parser import verb

EXAMPLES = ["paligemma-xray report eval-r1 --compare eval-base"]


def cmd_report(args: argparse.Namespace) -> int:
    from paligemma_xray.report import write_report

    path = write_report(
        args.eval_dir,
        args.out,
        run_dir=args.run,
        compare=args.compare,
        names=(args.name, args.compare_name),
        gallery=args.gallery,
    )
    print(path)
    return 0


def register(verbs: Any) -> None:
    p = verb(
        verbs,
        "report",
        cmd_report,
        help="rebuild the self-contained HTML report from an evaluation folder",
        description="Build ONE self-contained HTML file (no external assets) from EVAL_DIR's\n"
        "metrics.json and predictions.jsonl: metrics with CIs, PR and FROC curves,\n"
        "the loss curve of --run, and a gallery worst first. --compare puts a second\n"
        "evaluation (e.g. before fine-tuning) side by side.",
        examples=EXAMPLES,
    )
    p.add_argument("eval_dir", metavar="EVAL_DIR", help="folder written by `paligemma-xray evaluate`")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default EVAL_DIR/report.html)")
    p.add_argument(
        "--compare", "--compare-with", metavar="DIR", help="second evaluation folder, side by side"
    )
    p.add_argument(
        "--run", metavar="RUN", help="training run folder (its metrics.jsonl gives the loss curve)"
    )
    p.add_argument("--name", help="column title of EVAL_DIR (default: its model)")
    p.add_argument("--compare-name", help="column title of --compare (default: its model)")
    p.add_argument("--gallery", type=int, default=24, metavar="N", help="images in the gallery (default 24)")
