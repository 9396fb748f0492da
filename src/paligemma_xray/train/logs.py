"""What a run reports while it trains: ``metrics.jsonl``, TensorBoard and the progress bar.

Only the main process writes. Resuming first drops what a killed run logged after its last
checkpoint, so that the resumed log reads like the uninterrupted one (no step twice).

:func:`read_metrics` is the one reader of ``metrics.jsonl`` (the report's loss curve, the
live training page, the demo, the ``train`` verb's summary line). Its policy: blank lines
are skipped; a last line without its newline that is not JSON is what a killed run (or a
write in progress) leaves, and is dropped; any other line that is not a JSON object is a
:class:`~paligemma_xray.errors.DataError` naming ``file:line``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from paligemma_xray.atomic import disk_errors, write_text
from paligemma_xray.errors import DataError
from paligemma_xray.train.recipes import TrainConfig

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"  # in a run folder: one JSON object per line


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) + TensorBoard scalars under ``tb/``."""

    def __init__(self, out: Path, start: int, *, main: bool, resume: bool = False) -> None:
        self.main = main
        self.writer: Any = None
        self.path = out / METRICS_LOG
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


def read_metrics(path: str | Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run folder or the file itself), in order.

    A partial last line (no newline, not JSON: a killed run, or a line being written) is
    dropped; blank lines are skipped.

    Raises:
        DataError: no such file (unless ``missing_ok``: then ``[]``), or a line that is not
            a JSON object, naming ``file:line``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_LOG
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return []
        raise DataError(f"no {METRICS_LOG} here: not a training run folder", path=path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read this training log: {error}", path=path) from None
    lines = text.split("\n")  # the last item: "" after a final newline, else a line cut short
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines):  # no newline after it: a write that did not finish
                logger.warning("%s:%d: partial last line dropped (a run stopped while writing)", path, number)
                break
            raise DataError(f"not a JSON line: {error}", path=path, line=number) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=number)
        records.append(record)
    return records


def last_record(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The last record of ``kind`` (``"train"``, ``"eval"``…) of :func:`read_metrics`; ``{}`` if none."""
    return next((record for record in reversed(records) if record.get("kind") == kind), {})


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
