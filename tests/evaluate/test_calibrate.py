"""Calibration and operating points: scikit-learn's figures, brute-force thresholds, round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.calibrate import (
    calibration_figures,
    calibration_report,
    check_operating_point,
    choose_threshold,
    fit_calibration,
)
from paligemma_xray.evaluate.metrics import evaluate_detections
from paligemma_xray.infer.calibrated import Calibration, ScoreMap

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import random_set

CLASSES = ["fracture", "cast"]


def test_figures_are_scikit_learns_and_ece_is_the_binned_gap():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500)
    y = rng.uniform(0, 1, 500) < p**2  # over-confident probabilities
    figures = calibration_figures(p, y)
    assert figures["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-6)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    assert figures["curve"]["prob_true"] == pytest.approx(prob_true, abs=1e-6)
    assert figures["curve"]["prob_pred"] == pytest.approx(prob_pred, abs=1e-6)
    # ECE by hand: bins (k/10, (k+1)/10], the first one closed at 0.
    gap = 0.0
    for k in range(10):
        inside = (p > k / 10) & (p <= (k + 1) / 10) if k else (p <= 0.1)
        if inside.any():
            gap += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    assert figures["ece"] == pytest.approx(gap, abs=1e-6)
    assert sum(figures["curve"]["count"]) == 500


def test_platt_and_isotonic_are_scikit_learn_models_and_survive_json(tmp_path):
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    scores = rng.uniform(0.01, 0.3, 300)
    outcomes = rng.uniform(0, 1, 300) < np.sqrt(scores / 0.3)
    probe = np.linspace(0, 1, 57)
    logit = lambda v: np.log(np.clip(v, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(v, 1e-6, 1 - 1e-6))  # noqa: E731
    platt = ScoreMap.fit(scores, outcomes, "platt")
    reference = LogisticRegression().fit(logit(scores)[:, None], outcomes)
    assert platt(probe) == pytest.approx(reference.predict_proba(logit(probe)[:, None])[:, 1], abs=1e-12)
    iso = ScoreMap.fit(scores, outcomes, "isotonic")
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, outcomes.astype(float))
    assert iso(probe) == pytest.approx(reference.predict(probe), abs=1e-12)
    assert np.all(np.diff(platt(probe)) >= 0) and np.all(np.diff(iso(probe)) >= -1e-12)

    calibration = Calibration(platt, iso, 0.1234, "f1", 0.1, "platt", {"split": "valid"}, {"f1": 0.5})
    again = Calibration.load(calibration.save(tmp_path / "calibration.json"))
    assert again == calibration
    assert again.box_probability(probe) == pytest.approx(platt(probe), abs=0)


def test_a_single_outcome_gives_a_constant_map():
    constant = ScoreMap.fit([0.1, 0.2, 0.3], [False, False, False], "platt")
    assert constant.method == "constant" and constant([0.9]).tolist() == [0.0]


def test_calibration_fitted_on_one_half_improves_the_other():
    gts, prs = random_set(seed=21, n_images=120)
    # Squash the scores: the ranking stays, the probabilities become far too low.
    for p in prs:
        p.score = (p.score**3 * 0.2).astype(np.float32)
    fitted = fit_calibration(gts[:60], prs[:60], CLASSES, method="platt", iou_threshold=0.5)
    report = calibration_report(fitted, gts[60:], prs[60:], CLASSES)
    for level in ("box", "image"):
        before, after = report[level]["before"], report[level]["after"]
        assert after["ece"] < before["ece"] / 2
        assert after["brier"] < before["brier"]
    assert fitted.fitted_on["n_images"] == 60 and fitted.threshold is not None


def _brute_force(gts, prs, kind, target):
    """Every distinct score as a threshold, image-level figures counted one by one."""
    top = np.array([p.score.max() if len(p) else 0.0 for p in prs])
    positive = np.array([len(g) > 0 for g in gts])
    best = None
    for t in np.unique(np.concatenate([p.score for p in prs] + [np.nextafter(top, 1)])):
        called = (top >= t) & (top > 0)
        sens = (called & positive).sum() / positive.sum()
        spec = (~called & ~positive).sum() / (~positive).sum()
        if kind == "sensitivity" and sens >= target and (best is None or t > best):
            best = t
        if kind == "specificity" and spec >= target and (best is None or t < best):
            best = t
    return best


@pytest.mark.parametrize(
    "point", ["sensitivity=0.9", "sensitivity=0.75", "specificity=0.8", "specificity=0.95"]
)
def test_operating_points_meet_their_target_at_the_best_threshold(point):
    gts, prs = random_set(seed=31, n_images=60)
    threshold, valid = choose_threshold(gts, prs, CLASSES, point)
    kind, target = check_operating_point(point)
    assert valid["reached"]
    at = evaluate_detections(gts, prs, CLASSES, threshold=threshold, bootstrap=0)["image_level"]
    assert at[kind] >= target
    reference = _brute_force(gts, prs, kind, target)
    # Same operating point as the brute force (same images called), whatever float is printed.
    same = evaluate_detections(gts, prs, CLASSES, threshold=float(reference), bootstrap=0)["image_level"]
    assert (at["sensitivity"], at["specificity"]) == (same["sensitivity"], same["specificity"])


def test_f1_point_is_the_best_f1_threshold():
    gts, prs = random_set(seed=2)
    threshold, valid = choose_threshold(gts, prs, CLASSES, "f1")
    m = evaluate_detections(gts, prs, CLASSES, bootstrap=0)
    assert threshold == m["best_f1_threshold"] and valid["f1"] == pytest.approx(m["f1"])


@pytest.mark.parametrize("bad", ["f2", "sensitivity", "sensitivity=1.5", "specificity=0", "recall=0.9"])
def test_bad_operating_points_are_user_errors(bad):
    with pytest.raises(ConfigError, match="operating point"):
        check_operating_point(bad)
