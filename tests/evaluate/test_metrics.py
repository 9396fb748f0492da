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


def _pycocotools_eval(gts, prs, classes, iou_thresholds=None):
    """pycocotools' own evaluation of the same set (the independent reference)."""
    pycoco = pytest.importorskip("pycocotools.cocoeval")
    from pycocotools.coco import COCO

    gt_dict, results = coco_dicts(gts, prs, classes, np.arange(len(gts)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        evaluator = pycoco.COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def test_medical_map_agrees_with_pycocotools_at_iou_0_1_to_0_5():
    gts, prs = random_set(seed=11)
    classes = ["fracture", "cast"]
    ours = evaluate_detections(gts, prs, classes, bootstrap=0)
    evaluator = _pycocotools_eval(gts, prs, classes, np.linspace(0.1, 0.5, 9))
    p = evaluator.eval["precision"][:, :, :, 0, -1]
    assert ours["map10_50"] == pytest.approx(p[p > -1].mean(), abs=1e-9)
    # Lenient hits can only help: every box that matches at 0.5 matches at 0.1.
    assert ours["map10_50"] >= ours["map50"] - 1e-9
    for k, name in enumerate(classes):
        q = p[:, :, k]
        assert ours["ap_per_class"][name]["ap10_50"] == pytest.approx(q[q > -1].mean(), abs=1e-9)


@pytest.mark.parametrize("iou", [0.1, 0.5])
def test_froc_and_cpm_agree_with_an_nndetection_style_reference(iou):
    """pycocotools' matches, scikit-learn's ROC points, np.interp at 1/8…8 FP/image."""
    from sklearn.metrics import roc_curve

    gts, prs = random_set(seed=12, n_images=40)
    classes = ["fracture", "cast"]
    ours = evaluate_detections(gts, prs, classes, iou_threshold=iou, bootstrap=0)
    evaluator = _pycocotools_eval(gts, prs, classes, [iou])
    matched, scores = [], []
    for entry in evaluator.evalImgs:  # per category and image; area "all" comes first
        if entry is None or entry["aRng"] != evaluator.params.areaRng[0]:
            continue
        matched.extend((entry["dtMatches"][0] > 0).tolist())
        scores.extend(entry["dtScores"])
    matched, scores = np.array(matched), np.array(scores)
    n_gt = sum(len(g) for g in gts)
    fpr, tpr, _ = roc_curve(matched, scores)
    fps = fpr * (~matched).sum() / len(gts)
    sens = tpr * matched.sum() / n_gt
    reference = np.interp(FROC_FP_RATES, fps, sens)
    assert ours["froc"]["sensitivity"] == pytest.approx(reference.tolist(), abs=1e-9)
    assert ours["froc"]["score"] == pytest.approx(reference.mean(), abs=1e-9)


def test_hit_criterion_changes_the_threshold_figures_not_coco():
    # A box shifted by half its size: IoU 1/3, a hit at 0.1, a miss at 0.5.
    gt = [det([[0, 0, 40, 40]], ["fracture"])]
    pred = [det([[20, 0, 60, 40]], ["fracture"], [0.8])]
    strict = evaluate_detections(gt, pred, ["fracture"], threshold=0.5, iou_threshold=0.5, bootstrap=0)
    lenient = evaluate_detections(gt, pred, ["fracture"], threshold=0.5, iou_threshold=0.1, bootstrap=0)
    assert (strict["tp"], lenient["tp"]) == (0, 1)
    assert lenient["froc"]["score"] == 1.0 and strict["froc"]["score"] == 0.0
    assert strict["map50"] == lenient["map50"] == 0.0
    assert lenient["map10_50"] == pytest.approx(5 / 9, abs=1e-6)  # a hit at 0.10 … 0.30


def test_no_threshold_given_reports_at_this_sets_best_f1_and_says_so():
    gts, prs = random_set(seed=4)
    m = evaluate_detections(gts, prs, ["fracture", "cast"], bootstrap=0)
    assert m["threshold_source"] == "best_f1_here"
    assert m["threshold"] == m["best_f1_threshold"]
    assert m["precision"] is not None and m["recall"] > 0
    given = evaluate_detections(gts, prs, ["fracture", "cast"], threshold=0.5, bootstrap=0)
    assert given["threshold_source"] == "given"


def test_repeated_boxes_are_counted():
    gt = [det([[0, 0, 40, 40]], ["fracture"]), det([], [])]
    runaway = det([[0, 0, 40, 40], [1, 0, 40, 41], [0, 1, 41, 40], [100, 100, 150, 150]], ["fracture"] * 4)
    runaway.score = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    other_label = det([[0, 0, 40, 40], [0, 0, 40, 40]], ["fracture", "cast"], [0.5, 0.5])
    m = evaluate_detections(gt, [runaway, other_label], ["fracture", "cast"], bootstrap=0)
    assert m["duplicates"] == {"boxes": 2, "images": 1, "iou": 0.7}


def test_bootstrap_covers_the_medical_map_and_each_froc_rate():
    gts, prs = random_set(seed=5, n_images=25)
    m = evaluate_detections(gts, prs, ["fracture", "cast"], bootstrap=60, seed=1)
    low, high = m["ci95"]["map10_50"]
    assert low <= m["map10_50"] <= high and low < high
    for rate, value in zip(FROC_FP_RATES, m["froc"]["sensitivity"]):
        low, high = m["ci95"][f"froc_at_{rate:g}"]
        assert low <= value + 1e-9 and value <= high + 1e-9


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
