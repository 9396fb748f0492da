"""What duplicate merging and test-time augmentation (hflip + WBF) change, on one data set.

Decodes the valid and test splits once as they are and once mirrored, then scores every
variant from those same decodes (the fusion code is the library's: ``infer.fusion``):

* ``plain``: the model's answers as decoded;
* ``merge-nms`` / ``merge-wbf``: each answer's own near-duplicates merged;
* ``tta-hflip``: plain and mirrored answers (mirrored back) fused with WBF;
* ``tta-hflip+merge-nms``: the same after merging each answer's duplicates.

Each variant is reported on test at the operating point (best box F1) chosen on valid, and
compared with ``plain`` by the paired bootstrap of ``evaluate.compare`` (same images).
Quality, not speed: the baseline (``plain``) is measured in the same run on the same
decodes. Usage, on the demo's fine-tuned model::

    python benchmarks/fusion_gain.py --model demo-out/model --data demo-out/data \\
        --min-box-probability 0.05 --out benchmarks/results/fusion_gain.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import write_result
from PIL import ImageOps

from paligemma_xray.data import load_image, open_dataset, record_targets
from paligemma_xray.evaluate.calibrate import choose_threshold
from paligemma_xray.evaluate.compare import compare_models
from paligemma_xray.evaluate.folder import dataset_classes
from paligemma_xray.evaluate.metrics import evaluate_detections
from paligemma_xray.infer import Detector
from paligemma_xray.infer.fusion import fuse, hflip, merge_duplicates

FIGURES = ("map50", "map50_95", "map10_50", "f1", "precision", "recall")


def decode(detector: Detector, records, mirrored: bool, batch_size: int):
    images = (load_image(r.image) for r in records)
    if mirrored:
        images = (ImageOps.mirror(image) for image in images)
    found = [d for _, d in detector.iter_detect(images, [r.prefix for r in records], batch_size=batch_size)]
    return [hflip(d) for d in found] if mirrored else found


def variants(plain, mirrored) -> dict[str, list]:
    return {
        "plain": plain,
        "merge-nms": [merge_duplicates(d, "nms") for d in plain],
        "merge-wbf": [merge_duplicates(d, "wbf") for d in plain],
        "tta-hflip": [fuse([a, b]) for a, b in zip(plain, mirrored)],
        "tta-hflip+merge-nms": [
            fuse([merge_duplicates(a, "nms"), merge_duplicates(b, "nms")]) for a, b in zip(plain, mirrored)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--min-box-probability", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    detector = Detector.load(
        args.model, device="cpu", progress=False, min_box_probability=args.min_box_probability
    )
    dataset = open_dataset(args.data)
    splits = {}
    for split in ("valid", "test"):
        records = dataset.usable(split)
        plain = decode(detector, records, False, args.batch_size)
        mirrored = decode(detector, records, True, args.batch_size)
        truth = [record_targets(r, d.image_size) for r, d in zip(records, plain)]
        splits[split] = (truth, variants(plain, mirrored), dataset_classes([r.prefix for r in records]))
    decode_s = time.perf_counter() - started

    valid_truth, valid_variants, classes = splits["valid"]
    test_truth, test_variants, _ = splits["test"]
    result: dict = {"model": args.model, "data": args.data, "decode_s": round(decode_s, 1), "variants": {}}
    thresholds = {}
    for name, valid_predictions in valid_variants.items():
        threshold, _ = choose_threshold(valid_truth, valid_predictions, classes, "f1")
        thresholds[name] = 0.0 if threshold is None else threshold
        m = evaluate_detections(
            test_truth, test_variants[name], classes, threshold=thresholds[name], bootstrap=0
        )
        entry = {key: m[key] for key in FIGURES}
        entry.update(
            {
                "threshold": thresholds[name],
                "froc_score": m["froc"]["score"],
                "image_auc": m["image_level"]["auc"],
                "image_sensitivity": m["image_level"]["sensitivity"],
                "image_specificity": m["image_level"]["specificity"],
                "boxes": m["n_predictions"],
                "repeated_boxes": m["duplicates"]["boxes"],
            }
        )
        if name != "plain":
            comparison = compare_models(
                test_truth,
                test_variants[name],
                test_variants["plain"],
                classes,
                threshold_a=thresholds[name],
                threshold_b=thresholds["plain"],
                bootstrap=args.bootstrap,
            )
            entry["vs_plain"] = {
                key: {k: d[k] for k in ("value", "ci95", "p_value")}
                for key, d in comparison["differences"].items()
            }
            entry["vs_plain"]["image_auc_delong"] = comparison["image_auc"]
        result["variants"][name] = entry
    result["n_test_images"] = len(test_truth)
    result["n_valid_images"] = len(valid_truth)
    result["total_s"] = round(time.perf_counter() - started, 1)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
