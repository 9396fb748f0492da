"""Calibrated probabilities and the operating point, saved with the model.

A box's score (the geometric mean of its tokens' probabilities) ranks boxes well but is not
a probability: the demo model's best-F1 threshold sits at 0.087. A :class:`Calibration`
holds what turns scores into figures a clinician can use, fitted on a validation split by
:func:`paligemma_xray.evaluate.calibrate.fit_calibration`:

* ``box``: P(the box is a true positive at the calibration's IoU) from its score;
* ``image``: P(the image shows a fracture) from its highest box score (0 with no box);
* ``threshold``: the raw-score threshold of the chosen operating point (best F1, a target
  sensitivity or a target specificity), with what it gave on the validation split.

Both maps are scikit-learn models (Platt scaling: a logistic regression on the score's
logit; or isotonic regression), stored as their fitted parameters in ``calibration.json``
beside the weights (see :func:`calibration_path`). :meth:`Detector.load
<paligemma_xray.infer.Detector.load>` reads it (:func:`find_calibration`), so ``predict``
and ``serve`` default to the saved threshold and report the calibrated probability beside
the raw score.

A calibration belongs to the weights it was fitted on, and to no others: ``calibration.json``
records their :func:`~paligemma_xray.model.fingerprint.fingerprint` (``weights``), written by
:func:`save_with_model`, and :func:`find_calibration` applies it only when the weights beside
it still have that fingerprint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from paligemma_xray.errors import CheckpointError
from paligemma_xray.locations import Detections
from paligemma_xray.model.fingerprint import fingerprint
from paligemma_xray.model.forms import identify

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("platt", "isotonic")
#: 2: ``weights`` (the fingerprint of the weights it was fitted on) added.
FORMAT_VERSION = 2
_EPS = 1e-6  # scores are clipped to [eps, 1 - eps] before the logit (0: an image without boxes)


def _logit(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass
class ScoreMap:
    """A fitted, non-decreasing map from a raw score to a probability.

    ``method``: ``"platt"`` (``params``: ``coef``, ``intercept`` of scikit-learn's
    ``LogisticRegression`` on the score's logit), ``"isotonic"`` (``params``: ``x``, ``y``,
    the ``X_thresholds_`` / ``y_thresholds_`` of ``IsotonicRegression``), or ``"constant"``
    (``params``: ``p``; the fitting set had only one outcome, so no slope can be learnt).
    ``n`` / ``positives``: the size of the fitting set and how many outcomes were 1.
    """

    method: str
    params: dict[str, Any]
    n: int
    positives: int

    @classmethod
    def fit(cls, scores: Sequence[float], outcomes: Sequence[bool], method: str = "platt") -> ScoreMap:
        """Fit ``method`` to (score, outcome) pairs (outcome: True = the event happened)."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
        y = np.asarray(outcomes, dtype=bool).reshape(-1)
        n, positives = len(y), int(y.sum())
        if n == 0 or positives in (0, n):
            rate = positives / n if n else 0.0
            return cls("constant", {"p": rate}, n, positives)
        if method == "platt":
            model = LogisticRegression().fit(_logit(x)[:, None], y)
            params = {"coef": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])}
        else:
            model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y.astype(float))
            params = {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}
        return cls(method, params, n, positives)

    def _model(self):
        # The fitted scikit-learn model, rebuilt from its stored parameters.
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        if self.method == "platt":
            model = LogisticRegression()
            model.classes_ = np.array([False, True])
            model.coef_ = np.array([[self.params["coef"]]])
            model.intercept_ = np.array([self.params["intercept"]])
            model.n_features_in_ = 1
            return model
        # Isotonic regression of its own (non-decreasing) thresholds is those thresholds.
        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            np.asarray(self.params["x"]), np.asarray(self.params["y"])
        )

    def __call__(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Probabilities for ``scores`` (float64, same length)."""
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
        if self.method == "constant" or len(x) == 0:
            return np.full(len(x), float(self.params.get("p", 0.0)))
        if self.method == "platt":
            return self._model().predict_proba(_logit(x)[:, None])[:, 1]
        return np.clip(self._model().predict(x), 0.0, 1.0)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScoreMap:
        return cls(str(data["method"]), dict(data["params"]), int(data["n"]), int(data["positives"]))


def image_score(detections: Detections) -> float:
    """The score an image is judged by: its highest box score (0 when it has no box)."""
    if detections.score is None:
        return 1.0 if len(detections) else 0.0
    return float(detections.score.max()) if len(detections) else 0.0


@dataclass
class Calibration:
    """Score → probability maps and the operating point of one model (see the module doc).

    ``threshold`` is a raw score (boxes scored at least this much are kept), so it applies
    with or without the maps. ``operating_point``: how it was chosen (``"f1"``,
    ``"sensitivity=0.9"``, ``"specificity=0.95"``). ``fitted_on``: data, split, image and
    box counts; ``valid``: the figures the threshold gave on that split. ``weights``: the
    :func:`~paligemma_xray.model.fingerprint.fingerprint` of the weights it was fitted on
    (None: not known, e.g. an ensemble's, or a file from before format 2).
    """

    box: ScoreMap | None
    image: ScoreMap | None
    threshold: float | None
    operating_point: str | None
    iou_threshold: float
    method: str
    fitted_on: dict[str, Any] = field(default_factory=dict)
    valid: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] | None = None

    def box_probability(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """P(true positive) for each box score (the scores themselves without a box map)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        return self.box(scores) if self.box is not None else scores

    def image_probability(self, detections: Detections) -> float:
        """P(the image shows a fracture) from its highest box score."""
        score = image_score(detections)
        return float(self.image([score])[0]) if self.image is not None else score

    def describe(self, detections: Detections) -> dict[str, Any]:
        """What ``predict`` and ``serve`` report: each box's probability and the image's."""
        scores = detections.score if detections.score is not None else np.ones(len(detections))
        return {
            "box_probability": [round(float(p), 5) for p in self.box_probability(scores)],
            "image_probability": round(self.image_probability(detections), 5),
        }

    def add_to_json(self, data: dict[str, Any], detections: Detections) -> dict[str, Any]:
        """``detections.to_json()`` output with each box's ``probability`` and the image's added."""
        described = self.describe(detections)
        for obj, probability in zip(data.get("detections", []), described["box_probability"]):
            obj["probability"] = probability
        data["image_probability"] = described["image_probability"]
        data["operating_threshold"] = self.threshold
        return data

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            box=ScoreMap.from_json(data["box"]) if data.get("box") else None,
            image=ScoreMap.from_json(data["image"]) if data.get("image") else None,
            threshold=None if data.get("threshold") is None else float(data["threshold"]),
            operating_point=data.get("operating_point"),
            iou_threshold=float(data.get("iou_threshold", 0.5)),
            method=str(data.get("method", "platt")),
            fitted_on=dict(data.get("fitted_on") or {}),
            valid=dict(data.get("valid") or {}),
            weights=dict(data["weights"]) if data.get("weights") else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write this calibration as JSON to ``path`` (atomically)."""
        from paligemma_xray.atomic import write_json

        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a ``calibration.json``; :class:`CheckpointError` naming it if unreadable."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError("no calibration file here", path=path) from None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"unreadable calibration file: {error!r}", path=path) from None


def calibration_path(model_path: str | Path) -> Path:
    """Where the calibration of the model at ``model_path`` lives: with the weights ``model.load``
    reads (:func:`~paligemma_xray.model.forms.identify`).

    A big_vision file ``m.npz``: ``m.calibration.json`` beside it; an HF, adapter or
    trained-weights folder: inside it; a training run folder: inside the checkpoint
    ``model.load`` picks (``best/``, else ``last/``).
    """
    return identify(model_path).calibration


def save_with_model(
    calibration: Calibration, model_path: str | Path, *, weights: dict[str, Any] | None = None
) -> Path:
    """Save ``calibration`` with the model at ``model_path``, recording which weights it fits.

    ``weights``: the fingerprint of the weights it was fitted on, taken when they were loaded
    (``evaluate`` does); default: the weights at ``model_path`` now (a model just saved from
    the one the calibration was fitted on, as the demo does).
    """
    stamp = weights if weights is not None else fingerprint(model_path)
    return replace(calibration, weights=stamp).save(calibration_path(model_path))


def find_calibration(model_path: str | Path) -> Calibration | None:
    """The calibration saved with the weights at ``model_path``, or None when they have none.

    Applied only to the weights it was fitted on: when the fingerprint it records is not that
    of the weights beside it (a calibration copied next to other weights, weights replaced
    since), or it records none (written before format 2, when a run folder's calibration
    could land beside ``last/`` after being fitted on ``best/``), it is left out with a
    one-line warning naming the file. A warning, not a refusal: the weights themselves are
    sound and ``predict``/``serve`` still work, with raw scores and the default threshold, and
    ``evaluate --operating-point`` refits a calibration for them in minutes.
    """
    path = Path(model_path).expanduser()
    if not path.exists():  # a Hub id or kaggle: handle: no folder of ours
        return None
    file = calibration_path(path)
    if not file.is_file():
        return None
    calibration = Calibration.load(file)
    refit = f"run `paligemma-xray evaluate --operating-point` on {path} to fit one for these weights"
    if calibration.weights is None:
        logger.warning("%s: not applied: it does not record which weights it was fitted on; %s", file, refit)
        return None
    now = fingerprint(path, previous=calibration.weights)
    recorded = str(calibration.weights.get("sha256"))
    if now is None or now["sha256"] != recorded:
        current = now["sha256"][:12] if now else "none"
        logger.warning(
            "%s: not applied: fitted on other weights (sha256 %s, these are %s); %s",
            file,
            recorded[:12],
            current,
            refit,
        )
        return None
    return calibration
