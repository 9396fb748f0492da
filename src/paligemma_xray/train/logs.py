"""What a run reports while it trains: ``metrics.jsonl``, TensorBoard and the progress bar.

Only the main process writes. Resuming first drops what a killed run logged after its last
checkpoint, so that the resumed log reads like the uninterrupted one (no step twice).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from paligemma_xray.atomic import disk_errors, write_text
from paligemma_xray.train.recipes import TrainConfig

logger = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) + TensorBoard scalars under ``tb/``."""

    def __init__(self, out: Path, start: int, *, main: bool, resume: bool = False) -> None:
        self.main = main
        self.writer: Any = None
        self.path = out / "metrics.jsonl"
        if not main:
            return
        if resume and self.path.exists():  # start 0: a run killed before its first checkpoint
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start]
            write_text(self.path, "".join(f"{line}\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if resume else None)
        except ImportError:  # tensorboard is a dependency; a broken install only loses the plots
            logger.warning("tensorboard unavailable: no TensorBoard logs")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with ``kind`` and ``step``) and a time stamp; plot its numbers."""
        if not self.main:
            return
        # Whole lines appended: a kill leaves at most a partial last line, which resuming drops.
        with disk_errors(self.path), open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")
        if self.writer is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, int | float) and value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.writer is not None:
            self.writer.close()


def _step(line: str) -> float:
    """The step of one ``metrics.jsonl`` line; infinity for a blank or partial one (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def progress_bar(config: TrainConfig, start: int, *, main: bool) -> Any:
    """A tqdm bar over the run's steps on the main process, or ``None`` (``progress: false``)."""
    if not (config.progress and main):
        return None
    from paligemma_xray.progress import bar

    return bar(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
