"""A run folder as a kill right after checkpoint ``step`` leaves it, built from a finished run
(``from interrupted import interrupted_copy``; tests/train is on the path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


def interrupted_copy(run: Path, copy: Path, step: int) -> Path:
    """``copy``: ``run``'s config, its checkpoint ``step-{step}`` and its log up to that step.

    The finished run must have written that checkpoint (``checkpoint_every`` dividing it, a
    ``keep_last`` that kept it) and no ``best/`` before it (evaluate after ``step`` only).
    """
    copy.mkdir(parents=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["out"] = str(copy)  # config.yaml names the run's folder: the copy names its own
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(run / "checkpoints" / f"step-{step}", copy / "checkpoints" / f"step-{step}")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    kept = [row for row in rows if json.loads(row)["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(f"{row}\n" for row in kept))
    return copy
