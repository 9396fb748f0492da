"""evaluate in bfloat16 against float32 on a trained model: the same answers, recorded dtype."""

from __future__ import annotations

import json

import numpy as np

from paligemma_xray.cli import main
from paligemma_xray.evaluate.metrics import box_iou
from paligemma_xray.model import dtypes


def _evaluate(model, data, out, extra=()) -> tuple[dict, list[dict]]:
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--split", "train", "--out", str(out),
            "--bootstrap", "0", "--batch-size", "4", *extra]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), rows


def test_bfloat16_answers_match_float32(tiny_boxes_hf_dir, synthetic_dataset, tmp_path):
    """mAP@0.5 within 0.01, the same boxes (IoU >= 0.9) and scores within 0.05."""
    f32, f32_rows = _evaluate(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "f32", ["--dtype", "float32"])
    b16, b16_rows = _evaluate(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "b16", ["--dtype", "bfloat16"])
    assert (f32["dtype"], b16["dtype"]) == ("float32", "bfloat16")
    assert f32["n_predictions"] > 0
    assert abs(f32["map50"] - b16["map50"]) <= 0.01
    largest = 0.0
    for a, b in zip(f32_rows, b16_rows, strict=True):
        assert a["image"] == b["image"]
        da, db = a["prediction"]["detections"], b["prediction"]["detections"]
        assert len(da) == len(db), a["image"]
        if not da:
            continue
        iou = box_iou(np.array([d["box"] for d in da]), np.array([d["box"] for d in db]))
        assert np.diag(iou).min() >= 0.9
        largest = max(largest, max(abs(x["score"] - y["score"]) for x, y in zip(da, db)))
    assert largest <= 0.05, largest


def test_default_is_bfloat16_on_a_bf16_cpu_printed_once(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(dtypes, "_announced", set())
    metrics, _ = _evaluate(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "bf16cpu")
    assert metrics["dtype"] == "bfloat16"
    err = capsys.readouterr().err
    assert err.count("weights in bfloat16: this CPU has native bfloat16 matmul") == 1

    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    metrics, _ = _evaluate(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "plaincpu")
    assert metrics["dtype"] == "float32"  # the checkpoint's
    assert "weights in float32: the checkpoint's" in capsys.readouterr().err
