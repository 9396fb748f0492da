"""Detection metrics: COCO-exact mAP (checked against pycocotools), FROC, image level, CIs."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from paligemma_xray.evaluate.metrics import (
    FROC_FP_RATES,
    best_f1_threshold,
    coco_dicts,
    evaluate_detections,
    match,
)
from paligemma_xray.locations import Detections


def det(boxes, names, scores=None, size=(200, 200), issues=None) -> Detections:
    n = len(names)
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        class_name=list(names),
        class_id=np.zeros(n, np.int64),
        score=None if scores is None else np.array(scores, np.float32),
        seg_codes=-np.ones((n, 16), np.int16),
        image_size=size,
        parse_issues=issues or {},
    )


def random_set(seed: int, n_images: int = 30, classes=("fracture", "cast")):
    """A set where predictions are noisy copies of the truth plus some false alarms."""
    rng = np.random.default_rng(seed)
    gts, prs = [], []
    for _ in range(n_images):
        boxes, names = [], []
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 150, 2)
            boxes.append([x, y, x + rng.uniform(8, 50), y + rng.uniform(8, 50)])
            names.append(str(rng.choice(classes)))
        gts.append(det(boxes, names, size=(200, 180)))
        p_boxes, p_names = [], []
        for box, name in zip(boxes, names):
            if rng.random() < 0.8:
                p_boxes.append(np.array(box) + rng.normal(0, 3, 4))
                p_names.append(name)
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 150, 2)
            p_boxes.append([x, y, x + 30, y + 20])
            p_names.append(str(rng.choice(classes)))
        scores = np.round(rng.uniform(0.05, 1.0, len(p_names)), 3)
        prs.append(det(p_boxes, p_names, scores, size=(200, 180)))
    return gts, prs


def test_perfect_predictions_score_one():
    gt = [
        det([[10, 10, 50, 60]], ["fracture"]),
        det([], []),
        det([[0, 0, 20, 20], [100, 100, 150, 190]], ["fracture", "fracture"]),
    ]
    pred = [det(g.xyxy, g.class_name, np.full(len(g), 0.9)) for g in gt]
    m = evaluate_detections(gt, pred, ["fracture"], bootstrap=0)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx(1.0)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert m["froc"]["sensitivity"] == [1.0] * len(FROC_FP_RATES)
    assert m["image_level"]["sensitivity"] == 1.0 and m["image_level"]["specificity"] == 1.0
    assert m["n_ground_truth"] == 3 and m["n_positive_images"] == 2


def test_map_agrees_with_pycocotools():
    pycoco = pytest.importorskip("pycocotools.cocoeval")
    from pycocotools.coco import COCO

    gts, prs = random_set(seed=3)
    classes = ["fracture", "cast"]
    ours = evaluate_detections(gts, prs, classes, bootstrap=0)
    gt_dict, results = coco_dicts(gts, prs, classes, np.arange(len(gts)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        evaluator = pycoco.COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert 0.2 < ours["map50"] < 0.95  # a set where mAP is neither trivial 0 nor 1
    assert ours["map50_95"] == pytest.approx(evaluator.stats[0], abs=1e-9)
    assert ours["map50"] == pytest.approx(evaluator.stats[1], abs=1e-9)
    precision = evaluator.eval["precision"]
    for k, name in enumerate(classes):
        p = precision[0, :, k, 0, -1]
        assert ours["ap_per_class"][name]["ap50"] == pytest.approx(p[p > -1].mean(), abs=1e-9)


def test_threshold_froc_and_image_level_by_hand():
    # Image 0: one fracture found (0.9) plus a false alarm (0.8). Image 1: a fracture missed,
    # a false alarm at 0.3. Image 2: no fracture, a false alarm at 0.6.
    gt = [det([[0, 0, 50, 50]], ["fracture"]), det([[100, 100, 150, 150]], ["fracture"]), det([], [])]
    pred = [
        det([[1, 1, 50, 50], [120, 0, 180, 40]], ["fracture", "fracture"], [0.9, 0.8]),
        det([[0, 100, 40, 150]], ["fracture"], [0.3]),
        det([[10, 10, 30, 30]], ["fracture"], [0.6]),
    ]
    m = evaluate_detections(gt, pred, ["fracture"], threshold=0.5, bootstrap=0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.4)
    # Sorted: 0.9 TP (0 FP/img), 0.8 FP (1/3), 0.6 FP (2/3), 0.3 FP (1): sensitivity stays 0.5.
    assert m["froc"]["sensitivity"] == [0.5] * 7
    assert m["curves"]["froc"]["fp_per_image"] == pytest.approx([0, 0, 1 / 3, 2 / 3, 1])
    il = m["image_level"]
    assert (il["tp"], il["fn"], il["tn"], il["fp"]) == (1, 1, 0, 1)
    # Highest score per image: positives 0.9 and 0.3, negative 0.6 -> AUC 1/2.
    assert il["auc"] == pytest.approx(0.5)


def test_froc_points_between_rates():
    # Two fractures on two images; found at scores 0.9 and 0.5, four false alarms between.
    gt = [det([[0, 0, 50, 50]], ["fracture"]), det([[0, 0, 50, 50]], ["fracture"])]
    pred = [
        det([[0, 0, 50, 50], [100, 100, 120, 120], [150, 150, 170, 170]], ["fracture"] * 3, [0.9, 0.8, 0.7]),
        det([[0, 0, 50, 50], [100, 100, 120, 120], [150, 150, 170, 170]], ["fracture"] * 3, [0.5, 0.6, 0.65]),
    ]
    m = evaluate_detections(gt, pred, ["fracture"], bootstrap=0)
    # FP/img after each: 0.9 TP 0 | 0.8 .5 | 0.7 1 | 0.65 1.5 | 0.6 2 | 0.5 TP 2
    assert m["froc"]["sensitivity"] == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_unknown_labels_are_false_positives_and_parse_issues_summed():
    gt = [det([[0, 0, 50, 50]], ["fracture"])]
    pred = [
        det(
            [[0, 0, 50, 50], [0, 0, 50, 50]],
            ["fracture", "bone"],
            [0.9, 0.95],
            issues={"truncated": 2, "unknown_label": 1},
        )
    ]
    m = evaluate_detections(gt, pred, ["fracture"], bootstrap=0)
    assert (m["tp"], m["fp"]) == (1, 1)
    assert m["map50"] == pytest.approx(1.0)  # mAP ignores boxes of classes it does not evaluate
    assert m["parse_failures"]["total"] == 3 and m["parse_failures"]["truncated"] == 2


def test_matching_takes_each_truth_once_by_score():
    gt = det([[0, 0, 100, 100]], ["fracture"])
    pred = det([[0, 0, 100, 90], [0, 0, 100, 100]], ["fracture", "fracture"], [0.4, 0.8])
    m = match(gt, pred, ["fracture"])
    assert m.pred_tp.tolist() == [False, True]
    assert m.gt_matched_by.tolist() == [1]


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    gts, prs = random_set(seed=5, n_images=25)
    a = evaluate_detections(gts, prs, ["fracture", "cast"], bootstrap=100, seed=7)
    b = evaluate_detections(gts, prs, ["fracture", "cast"], bootstrap=100, seed=7)
    c = evaluate_detections(gts, prs, ["fracture", "cast"], bootstrap=100, seed=8)
    assert a["ci95"] == b["ci95"]
    assert a["ci95"] != c["ci95"]
    for key in ("map50", "map50_95", "precision", "recall", "f1"):
        low, high = a["ci95"][key]
        assert low < high
        assert low <= a[key] <= high


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="ground-truth"):
        evaluate_detections([det([], [])], [], ["fracture"])


def test_best_f1_threshold_is_the_best_of_every_possible_operating_point():
    classes = ["fracture", "cast"]
    for seed in range(4):
        gts, prs = random_set(seed)
        chosen = best_f1_threshold(gts, prs, classes)
        assert chosen in {float(s) for p in prs for s in p.score}  # a score one can set
        thresholds = np.unique(np.concatenate([p.score for p in prs])).tolist()
        f1 = {t: evaluate_detections(gts, prs, classes, threshold=t, bootstrap=0)["f1"] for t in thresholds}
        assert f1[chosen] == pytest.approx(max(f1.values()))
        assert evaluate_detections(gts, prs, classes, bootstrap=0)["best_f1_threshold"] == chosen


def test_best_f1_threshold_is_none_without_a_true_positive():
    truth = [det([[0, 0, 10, 10]], ["fracture"])]
    wrong = [det([[100, 100, 120, 120]], ["fracture"], [0.9])]
    assert best_f1_threshold(truth, wrong, ["fracture"]) is None


def test_image_auc_counts_ties_half_like_the_pairwise_definition():
    # Highest box score per image; an image without boxes scores 0.
    positives, negatives = [0.9, 0.5, 0.5], [0.5, 0.2, None]
    gt = [det([[0, 0, 50, 50]], ["fracture"]) for _ in positives] + [det([], []) for _ in negatives]
    box = [[0, 0, 50, 50]]
    pred = [det(box, ["fracture"], [s]) if s is not None else det([], []) for s in positives + negatives]
    auc = evaluate_detections(gt, pred, ["fracture"], bootstrap=0)["image_level"]["auc"]
    # Independent reference: P(positive outscores negative) over all pairs, ties counting 1/2.
    scores_neg = [s or 0.0 for s in negatives]
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in scores_neg]
    assert auc == pytest.approx(sum(pairs) / len(pairs)) and auc == pytest.approx(8 / 9)
