"""The training loop's state: what a checkpoint must bring back for an exact resume.

Kept apart from the loop so that the one object the loop mutates has a type, and so that
the rule choosing ``best/`` is written (and tested) once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def best_key(metrics: dict[str, Any]) -> str:
    """The figure that ranks evaluations: ``map50`` when decoding produced one, else ``val_loss``."""
    return "map50" if metrics.get("map50") is not None else "val_loss"


@dataclass
class TrainState:
    """Optimiser steps done and the best evaluation so far (saved as a checkpoint's ``state.json``)."""

    step: int = 0
    best_metric: str = "val_loss"
    best_value: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    stale_evals: int = 0
    """Evaluations since the last new best (what ``early_stop`` counts)."""
    runtime: dict[str, Any] = field(default_factory=dict)
    """What bit-exactness depends on, as the run started (:func:`runtime`): a resume under
    other values continues the run, but its floats differ from an uninterrupted run's."""
    runtime_changed: bool = False
    """Whether some part of the run ran under other :attr:`runtime` values (not bit-exact)."""

    def improves(self, metrics: dict[str, Any]) -> bool:
        """Whether ``metrics`` beat the best so far.

        Higher mAP wins (ties: lower validation loss, so that an untrained model's constant
        mAP of 0 does not pin ``best/`` to the first evaluation); without mAP, lower loss wins.
        """
        key = best_key(metrics)
        value = metrics[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best_value is None or self.best_metric != key:
            return True
        if key == "map50" and value != self.best_value:
            return value > self.best_value
        return self.best_val_loss is None or metrics["val_loss"] < self.best_val_loss

    def record_best(self, metrics: dict[str, Any], step: int) -> None:
        """Remember ``metrics`` (of the evaluation after ``step``) as the best so far."""
        key = best_key(metrics)
        self.best_step, self.best_metric = step, key
        self.best_value, self.best_val_loss = metrics[key], metrics["val_loss"]

    def resumed_under(self, current: dict[str, Any]) -> str | None:
        """Note a resume under ``current`` (:func:`runtime`); returns the one line to print
        where it differs from what the run started under (``None``: an exact resume)."""
        if not self.runtime:  # a checkpoint of an earlier version: nothing recorded
            self.runtime = dict(current)
            return None
        changed = [
            f"{key} {current.get(key)} (the run started with {self.runtime.get(key)})"
            for key in sorted(set(self.runtime) | set(current))
            if self.runtime.get(key) != current.get(key)
        ]
        if not changed:
            return None
        self.runtime_changed = True
        return (
            f"resuming with {', '.join(changed)}: the run continues, but its results will differ "
            "from an uninterrupted run's in the last bits"
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        """Read :meth:`to_json` output; keys it does not know (e.g. ``scheduler``) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def runtime(device: Any, processes: int = 1) -> dict[str, Any]:
    """What a run's floats depend on besides its recipe and data: the torch version, the
    number of CPU threads (float sums are split differently), the device, the number of
    processes, and whether torch's deterministic algorithms are on.

    Two runs of one recipe under the same values give bit-identical weights; under other
    values they agree to rounding only.
    """
    import torch

    kind = getattr(device, "type", str(device))
    name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": name,
        "processes": processes,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
