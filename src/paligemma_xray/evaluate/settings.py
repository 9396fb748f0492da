"""The ``evaluate`` verb's settings: decoding (from ``infer``) plus the evaluation's own.

One declaration gives ``evaluate``'s flags, ``--help``, ``--config`` keys and checks
(:mod:`paligemma_xray.settings`); :func:`~paligemma_xray.evaluate.runner.evaluate` takes it.
No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import model_validator
from pydantic.dataclasses import dataclass

from paligemma_xray.data.bad_records import DEFAULT_MAX_BAD_RECORDS, BadRecords
from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.calibrate import check_operating_point
from paligemma_xray.evaluate.metrics import check_options
from paligemma_xray.infer.settings import DetectSettings
from paligemma_xray.settings import SETTINGS_CONFIG, Float, flag


@dataclass(config=SETTINGS_CONFIG)
class EvaluateSettings(DetectSettings):
    """Detect on every image of a data set split and score it (``evaluate``)."""

    data: Annotated[str, flag(metavar="D", required=True)] = ""
    """Data set folder."""
    split: Literal["train", "valid", "test"] = "test"
    """Split evaluated."""
    out: Annotated[str, flag(metavar="DIR", required=True)] = ""
    """Output folder."""
    threshold: Annotated[Float | None, flag(metavar="T")] = None
    """Score threshold for precision/recall/F1 and image level (default: the
    --operating-point, else the one saved with the model, else this split's best F1,
    labelled as such)."""
    operating_point: Annotated[str | None, flag(metavar="P")] = None
    """f1 | sensitivity=S | specificity=S: choose the threshold on the valid split (best box
    F1, or the image-level sensitivity / specificity target), fit the calibration there,
    report this split at it, and save both with the model."""
    calibration_method: Annotated[Literal["platt", "isotonic"], flag("--calibration")] = "platt"
    """Calibration method fitted with --operating-point (platt: logistic regression on the
    score's logit, robust on small validation sets)."""
    save_calibration: Annotated[bool, flag("--no-save-calibration")] = True
    """Write calibration.json beside the model (--no-save-calibration: only in OUT)."""
    iou_threshold: Annotated[Float, flag("--iou", metavar="T")] = 0.5
    """IoU of a hit for precision/recall, FROC, image level and the calibration (0.1 is the
    usual medical criterion). mAP keeps COCO's thresholds."""
    bootstrap: Annotated[int, flag(metavar="N")] = 1000
    """Bootstrap resamples for the 95% intervals (0: none)."""
    seed: int = 0
    """Bootstrap seed."""
    compare: Annotated[str | None, flag(metavar="DIR")] = None
    """Another evaluation folder of the same images: the report puts it beside this one and
    compares the two (paired bootstrap differences in mAP, FROC, sensitivity and specificity
    with p-values; DeLong's test of the image AUC): comparison.json."""
    run: Annotated[str | None, flag(metavar="RUN")] = None
    """Training run folder: adds its loss curve to the report."""
    overwrite: bool = False
    """Replace an earlier evaluation in OUT."""
    max_bad_records: Annotated[int, flag(metavar="N")] = DEFAULT_MAX_BAD_RECORDS
    """Skip (and count) records whose image cannot be decoded; stop past N."""
    allow_outside_images: bool = False
    """Use records whose image lies outside the data set's folder (../.., absolute paths,
    symlinks pointing out); by default they are skipped as errors."""

    @model_validator(mode="after")
    def _evaluates(self) -> EvaluateSettings:
        check_options(threshold=self.threshold, iou_threshold=self.iou_threshold, bootstrap=self.bootstrap)
        if self.operating_point is not None:
            check_operating_point(self.operating_point)
        BadRecords(self.max_bad_records)  # a negative limit is refused here
        return self

    def calibration_owner(self) -> str | None:
        """The model the fitted calibration is saved beside (``calibration_path`` of it), if any.

        Only a single local model, unfused, and not with ``--no-save-calibration``: a Hub id
        or a ``kaggle:`` handle has no folder of ours, and an ensemble no one set of weights.
        """
        if not self.save_calibration or not self.model or self.fused or not Path(self.model[0]).exists():
            return None
        return self.model[0]

    def check_paths(self) -> None:
        """The ``--compare`` and ``--run`` folders exist (before the model loads)."""
        if self.compare is not None:
            from paligemma_xray.evaluate.compare import check_compare

            check_compare(self.compare)
        if self.run is not None and not Path(self.run).is_dir():
            raise ConfigError("no such training run folder (--run)", path=self.run)
