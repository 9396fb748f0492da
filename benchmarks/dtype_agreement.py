"""Same answers in bfloat16: one model evaluated in float32 and in bfloat16, compared.

``evaluate`` runs twice on the same split, each in a fresh process, ``--dtype float32`` and
``--dtype bfloat16`` (the CPU default where bf16 is native), with the extra flags given (the
demo evaluates with ``--min-box-probability 0.05``). Reported: mAP@0.5 and mAP@[.5:.95]
both ways and their difference, boxes per dtype, images whose box count differs, and over
the boxes matched image by image (Hungarian on IoU, IoU ≥ 0.5): the largest and median
score difference and how many moved (IoU < 0.99). Target (issue 23): |ΔmAP@0.5| ≤ 0.01.

    .venv/bin/python benchmarks/dtype_agreement.py --model /tmp/demo-out/model \\
        --data /tmp/demo-out/data --extra=--min-box-probability=0.05 \\
        --out benchmarks/results/dtype_agreement.json

(``paligemma-xray demo --out /tmp/demo-out`` makes that model and data set.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import write_result
from scipy.optimize import linear_sum_assignment

from paligemma_xray.evaluate.metrics import box_iou

DTYPES = ("float32", "bfloat16")


def evaluate(model: str, data: str, split: str, dtype: str, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "paligemma_xray.cli", "evaluate", "--model", model, "--data", data,
               "--split", split, "--dtype", dtype, "--out", str(out), "--bootstrap", "0", "--overwrite",
               "--no-progress", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"evaluate --dtype {dtype} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "rows": {row["image"]: row["prediction"]["detections"] for row in rows}}


def compare(a: dict, b: dict) -> dict:
    score_differences: list[float] = []
    moved = count_differs = 0
    for image, boxes_a in a["rows"].items():
        boxes_b = b["rows"][image]
        count_differs += len(boxes_a) != len(boxes_b)
        if not boxes_a or not boxes_b:
            continue
        iou = box_iou(np.array([d["box"] for d in boxes_a]), np.array([d["box"] for d in boxes_b]))
        for i, j in zip(*linear_sum_assignment(-iou)):
            if iou[i, j] < 0.5:
                continue
            score_differences.append(float(abs(boxes_a[i]["score"] - boxes_b[j]["score"])))
            moved += int(iou[i, j] < 0.99)
    ma, mb = a["metrics"], b["metrics"]
    return {
        "map50": {"float32": ma["map50"], "bfloat16": mb["map50"], "difference": mb["map50"] - ma["map50"]},
        "map50_95": {"float32": ma["map50_95"], "bfloat16": mb["map50_95"]},
        "boxes": {
            "float32": sum(map(len, a["rows"].values())),
            "bfloat16": sum(map(len, b["rows"].values())),
        },
        "images": len(a["rows"]),
        "images_whose_box_count_differs": count_differs,
        "matched_boxes": len(score_differences),
        "matched_boxes_moved": moved,
        "largest_score_difference": max(score_differences, default=0.0),
        "median_score_difference": statistics.median(score_differences) if score_differences else 0.0,
        "dtypes_recorded": [ma.get("dtype"), mb.get("dtype")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint (the demo's: OUT/model)")
    parser.add_argument("--data", required=True, help="data set (the demo's: OUT/data)")
    parser.add_argument("--split", default="test", help="split (default test)")
    parser.add_argument(
        "--extra", action="append", default=[], help="more evaluate flags, e.g. --extra=--batch-size=4"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()
    extra = [part for flag in args.extra for part in flag.split("=", 1)]
    with tempfile.TemporaryDirectory() as work:
        runs = [evaluate(args.model, args.data, args.split, d, Path(work) / d, extra) for d in DTYPES]
    result = {"benchmark": "dtype_agreement", "model": args.model, "split": args.split, "flags": extra}
    result.update(compare(*runs))
    result["target"] = "|map50 difference| <= 0.01"
    result["met"] = abs(result["map50"]["difference"]) <= 0.01
    write_result(result, args.out)


if __name__ == "__main__":
    main()
