"""Fusion: mirrored boxes, weighted box fusion semantics, duplicate merging, TTA and ensembles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.metrics import box_iou, duplicate_boxes
from paligemma_xray.infer.fusion import FusedDetector, fuse, hflip, merge_duplicates
from paligemma_xray.locations import Detections

SIZE = (200, 100)


def det(boxes, scores, names=None) -> Detections:
    n = len(boxes)
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        class_name=names or ["fracture"] * n,
        class_id=np.zeros(n, np.int64),
        score=np.array(scores, np.float32),
        seg_codes=-np.ones((n, 16), np.int16),
        image_size=SIZE,
    )


def test_hflip_mirrors_boxes_and_is_its_own_inverse():
    d = det([[10, 5, 50, 40]], [0.5])
    assert hflip(d).xyxy.tolist() == [[150, 5, 190, 40]]
    assert hflip(hflip(d)).xyxy == pytest.approx(d.xyxy)


def test_wbf_of_agreeing_answers_averages_and_lone_boxes_lose_half():
    a = det([[10, 10, 50, 50], [120, 20, 180, 90]], [0.8, 0.6])
    b = det([[14, 10, 54, 50]], [0.4])
    fused = fuse([a, b])
    order = np.argsort(fused.xyxy[:, 0])
    boxes, scores = fused.xyxy[order], fused.score[order]
    # Agreeing pair: score-weighted mean box, mean score; the box only one answer has: half.
    assert boxes[0] == pytest.approx(
        [(10 * 0.8 + 14 * 0.4) / 1.2, 10, (50 * 0.8 + 54 * 0.4) / 1.2, 50], abs=1e-3
    )
    assert scores.tolist() == pytest.approx([0.6, 0.3], abs=1e-6)
    assert boxes[1] == pytest.approx([120, 20, 180, 90], abs=1e-3)
    assert fuse([a, a]).score.tolist() == pytest.approx(sorted(a.score.tolist(), reverse=True), abs=1e-6)


def test_labels_are_fused_separately_and_empty_answers_are_fine():
    a = det([[10, 10, 50, 50], [10, 10, 50, 50]], [0.9, 0.5], ["fracture", "cast"])
    fused = fuse([a, Detections.empty(SIZE)])
    assert sorted(fused.class_name) == ["cast", "fracture"]
    assert len(fuse([Detections.empty(SIZE), Detections.empty(SIZE)])) == 0


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_merging_leaves_no_repeated_box(method):
    runaway = det(
        [[10, 10, 50, 50], [11, 10, 50, 51], [10, 11, 51, 50], [100, 50, 150, 90]], [0.9, 0.8, 0.7, 0.6]
    )
    assert duplicate_boxes(runaway).sum() == 2
    merged = merge_duplicates(runaway, method)
    assert len(merged) == 2 and duplicate_boxes(merged).sum() == 0
    if method == "nms":  # NMS keeps the best-scored box as it was
        assert (
            merged.score.max() == pytest.approx(0.9)
            and box_iou(merged.xyxy[:1], runaway.xyxy[:1])[0, 0] > 0.99
        )


def test_tta_and_ensembles_on_the_two_box_model(tiny_boxes_hf_dir, tiny_boxes):
    from paligemma_xray.infer import Detector

    detector = Detector.load(tiny_boxes_hf_dir, device="cpu", progress=False)
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), np.uint8)) for i in range(2)
    ]
    plain = detector.detect(images)
    twice = FusedDetector([detector, detector]).detect(images)
    for p, t in zip(plain, twice):  # a model fused with itself is itself
        order_p, order_t = np.argsort(-p.score), np.argsort(-t.score)
        assert t.xyxy[order_t] == pytest.approx(p.xyxy[order_p], abs=1e-3)
        assert t.score[order_t] == pytest.approx(p.score[order_p], abs=1e-5)
    tta = FusedDetector([detector], tta=["hflip"])
    found = tta.detect(images)
    for image, p, f in zip(images, plain, found):
        mirrored = hflip(detector.detect([ImageOps.mirror(image)])[0])
        # Every fused box is a finding of both views (mean score) or of one (half its score).
        for box, score in zip(f.xyxy, f.score):
            in_plain = p.score[box_iou(p.xyxy, box[None])[:, 0] > 0.55]
            in_mirror = mirrored.score[box_iou(mirrored.xyxy, box[None])[:, 0] > 0.55]
            assert len(in_plain) <= 1 and len(in_mirror) <= 1 and len(in_plain) + len(in_mirror) >= 1
            assert score == pytest.approx((in_plain.sum() + in_mirror.sum()) / 2, rel=1e-4)
        assert len(f) >= max(len(p), len(mirrored))
    # This model's centred box (x 0.3-0.7) is its own mirror image: found by both views.
    centred = np.array(tiny_boxes[0]) * [128, 96, 128, 96]
    assert box_iou(found[0].xyxy, centred[None]).max() > 0.9
    assert "hflip" in tta.model_id


def test_bad_fusion_settings_are_user_errors(tiny_boxes_hf_dir):
    with pytest.raises(ConfigError, match="augmentation"):
        FusedDetector([object()], tta=["rotate"])  # checked before anything else
    with pytest.raises(ConfigError, match="at least one"):
        FusedDetector([])
    with pytest.raises(ConfigError, match="fusion method"):
        fuse([det([], [])], method="mean")
