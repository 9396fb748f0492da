"""``paligemma-xray report EVAL_DIR``: the self-contained HTML report of an evaluation."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic.dataclasses import dataclass

from paligemma_xray.cli.parser import verb
from paligemma_xray.settings import SETTINGS_CONFIG, flag

EXAMPLES = ["paligemma-xray report eval-r1 --compare eval-base"]


@dataclass(config=SETTINGS_CONFIG)
class ReportSettings:
    """``report``: one self-contained HTML file from an evaluation folder."""

    eval_dir: Annotated[str, flag(positional=True, metavar="EVAL_DIR", required=True)] = ""
    """Folder written by `paligemma-xray evaluate`."""
    out: Annotated[str | None, flag(metavar="FILE")] = None
    """HTML file to write (default EVAL_DIR/report.html)."""
    compare: Annotated[str | None, flag("--compare", "--compare-with", metavar="DIR")] = None
    """Second evaluation folder, side by side."""
    run: Annotated[str | None, flag(metavar="RUN")] = None
    """Training run folder (its metrics.jsonl gives the loss curve)."""
    name: str | None = None
    """Column title of EVAL_DIR (default: its model)."""
    compare_name: str | None = None
    """Column title of --compare (default: its model)."""
    gallery: Annotated[int, flag(metavar="N")] = 24
    """Images in the gallery."""


def report(settings: ReportSettings) -> int:
    from paligemma_xray.report import write_report

    path = write_report(
        settings.eval_dir,
        settings.out,
        run_dir=settings.run,
        compare=settings.compare,
        names=(settings.name, settings.compare_name),
        gallery=settings.gallery,
    )
    print(path)
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "report",
        report,
        help="rebuild the self-contained HTML report from an evaluation folder",
        description="Build ONE self-contained HTML file (no external assets) from EVAL_DIR's\n"
        "metrics.json and predictions.jsonl: metrics with CIs, PR and FROC curves,\n"
        "the loss curve of --run, and a gallery worst first. --compare puts a second\n"
        "evaluation (e.g. before fine-tuning) side by side.",
        examples=EXAMPLES,
        settings=ReportSettings,
    )
