"""Comparing two models: DeLong against DeLong's own formulas, paired bootstrap, pairing checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from paligemma_xray.errors import DataError
from paligemma_xray.evaluate.compare import compare_evaluations, compare_models, delong
from paligemma_xray.evaluate.metrics import evaluate_detections

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import random_set

CLASSES = ["fracture", "cast"]


def delong_1988(truth, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988): structural components, pair by pair (O(m·n))."""
    truth = np.asarray(truth, bool)
    components = []
    for scores in (np.asarray(a, float), np.asarray(b, float)):
        x, y = scores[truth], scores[~truth]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / truth.sum() + s01 / (~truth).sum()
    z = (auc_a - auc_b) / math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return auc_a, auc_b, z, 2 * norm.sf(abs(z))


def test_delong_matches_the_original_formulas_with_ties():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=90) < 0.4
    a = np.round(truth * 0.8 + rng.normal(0, 0.6, 90), 1)  # rounded: ties within and across classes
    b = np.round(truth * 0.3 + rng.normal(0, 0.6, 90), 1)
    ours = delong(truth, a, b)
    auc_a, auc_b, z, p = delong_1988(truth, a, b)
    assert ours["method"] == "delong"
    assert ours["auc_a"] == pytest.approx(auc_a, abs=1e-12) and ours["auc_b"] == pytest.approx(
        auc_b, abs=1e-12
    )
    assert ours["difference"] == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert ours["z"] == pytest.approx(z, rel=1e-9) and ours["p_value"] == pytest.approx(p, rel=1e-9)
    assert ours["p_value"] < 0.05  # a clearly better model


def test_identical_models_differ_by_nothing():
    gts, prs = random_set(seed=8, n_images=30)
    result = compare_models(gts, prs, prs, CLASSES, threshold_a=0.3, threshold_b=0.3, bootstrap=30)
    for key, d in result["differences"].items():
        assert d["value"] in (0.0, None), key
        if d["value"] is not None:
            assert d["p_value"] == 1.0 and d["ci95"] == [0.0, 0.0]
    assert result["image_auc"]["difference"] == 0.0 and result["image_auc"]["p_value"] == 1.0


def test_a_much_worse_model_is_significantly_worse_and_figures_are_the_evaluations():
    gts, good = random_set(seed=9, n_images=60)
    rng = np.random.default_rng(1)
    bad = []
    for p in good:  # same boxes, scores shuffled at random: ranking information destroyed
        q = p[np.arange(len(p))]
        q.score = rng.uniform(0.05, 1, len(p)).astype(np.float32)
        q.xyxy = q.xyxy + 30  # and boxes moved off their fractures
        bad.append(q)
    result = compare_models(gts, good, bad, CLASSES, threshold_a=0.2, threshold_b=0.4, bootstrap=100, seed=3)
    m_good = evaluate_detections(gts, good, CLASSES, threshold=0.2, bootstrap=0)
    m_bad = evaluate_detections(gts, bad, CLASSES, threshold=0.4, bootstrap=0)
    d = result["differences"]
    assert d["map50"]["value"] == pytest.approx(m_good["map50"] - m_bad["map50"], abs=1e-9)
    assert d["froc_score"]["value"] == pytest.approx(
        m_good["froc"]["score"] - m_bad["froc"]["score"], abs=1e-9
    )
    assert d["image_sensitivity"]["a"] == m_good["image_level"]["sensitivity"]
    for key in ("map50", "map10_50", "froc_score"):
        low, high = d[key]["ci95"]
        assert 0 < low <= d[key]["value"] <= high
        assert d[key]["p_value"] < 0.05
    assert result["bootstrap"]["paired"] is True


def test_evaluations_of_different_images_are_refused():
    gts, prs = random_set(seed=10, n_images=4)
    rows = [
        {"image": f"/x/{i}.png", "ground_truth": g, "prediction": p} for i, (g, p) in enumerate(zip(gts, prs))
    ]
    other = [dict(r, image=r["image"].replace("3.png", "9.png")) for r in rows]
    metrics = {"classes": CLASSES, "threshold": 0.5}
    with pytest.raises(DataError, match="same images"):
        compare_evaluations(rows, metrics, other, metrics, bootstrap=5)
    shuffled = compare_evaluations(rows, metrics, rows[::-1], metrics, bootstrap=5)  # paired by path
    assert shuffled["differences"]["map50"]["value"] == 0.0
