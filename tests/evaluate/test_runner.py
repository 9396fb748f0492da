"""`paligemma-xray evaluate` end to end, and data-parallel (2 CPU processes, gloo) = 1 process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from paligemma_xray.cli import main

EXPECTED_KEYS = {
    "map50",
    "map50_95",
    "ap_per_class",
    "precision",
    "recall",
    "f1",
    "froc",
    "image_level",
    "parse_failures",
    "ci95",
    "curves",
    "model",
    "split",
}


def run_eval(model: Path, data: Path, out: Path, extra=()) -> dict:
    code = main(
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(data),
            "--split",
            "train",
            "--out",
            str(out),
            "--bootstrap",
            "20",
            "--batch-size",
            "3",
            *extra,
        ]
    )
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_cli_writes_metrics_predictions_report(tiny_boxes_hf_dir, synthetic_dataset, tmp_path):
    metrics = run_eval(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "ev")
    assert set(metrics) >= EXPECTED_KEYS
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["n_images"] > 4
    assert metrics["n_predictions"] == sum(len(r["prediction"]["detections"]) for r in rows) > 0
    assert (tmp_path / "ev" / "report.html").stat().st_size > 10_000
    coco = json.loads((tmp_path / "ev" / "ground_truth.coco.json").read_text())
    assert len(coco["images"]) == len(rows) and len(coco["annotations"]) == metrics["n_ground_truth"]
    # The second evaluation is the comparison column of the first one's report.
    run_eval(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "ev2", ["--compare", str(tmp_path / "ev")])
    assert (tmp_path / "ev2" / "report.html").read_text().count("<svg") == 2


def test_evaluate_bad_data_folder_is_a_user_error(tiny_hf_dir, tmp_path, capsys):
    code = main(
        ["evaluate", "--model", str(tiny_hf_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert str(tmp_path) in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_to_the_single_process_result(tiny_boxes_hf_dir, synthetic_dataset, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this Python")
    single = run_eval(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "paligemma_xray.cli",
            "evaluate",
            "--model",
            str(tiny_boxes_hf_dir),
            "--data",
            str(synthetic_dataset),
            "--split",
            "train",
            "--out",
            str(tmp_path / "multi"),
            "--bootstrap",
            "20",
            "--batch-size",
            "3",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert multi.pop("world_size") == 2 and single.pop("world_size") == 1
    multi.pop("seconds"), single.pop("seconds")
    assert multi == single
    for name in ("predictions.jsonl", "predictions.coco.json", "ground_truth.coco.json"):
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "2"], "threshold is a score between 0 and 1"),
        (["--bootstrap", "-5"], "bootstrap is a number of resamples"),
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--split", "train", "--data", "EMPTY"], "no usable record"),
        (["--operating-point", "sensitivity=2"], "operating point"),
        (["--iou", "0"], "iou_threshold must be in (0, 1]"),
        (["--compare", "NOWHERE"], "no metrics file here"),
    ],
)
def test_evaluate_mistakes_are_user_errors_and_write_nothing(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys, flags, message
):
    empty = tmp_path / "empty"
    (empty / "dataset").mkdir(parents=True)
    (empty / "dataset" / "_annotations.train.jsonl").write_text("")
    named = {"EMPTY": str(empty), "NOWHERE": str(tmp_path / "nowhere")}
    flags = [named.get(f, f) for f in flags]
    out = tmp_path / "o"
    argv = ["evaluate", "--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--out", str(out)]
    assert main([*argv, "--bootstrap", "0", *flags]) == 2
    assert message in capsys.readouterr().err  # each used to run and write metrics.json
    assert not out.exists()


def test_operating_point_chosen_on_valid_is_saved_with_the_model_and_reused(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path, capsys
):
    from paligemma_xray.infer.calibrated import Calibration

    model = tmp_path / "model"
    shutil.copytree(tiny_boxes_hf_dir, model)
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", str(model), "--data", str(synthetic_dataset), "--split", "test",
            "--bootstrap", "20", "--batch-size", "4", "--iou", "0.1"]  # fmt: skip
    assert main([*argv, "--out", str(out), "--operating-point", "sensitivity=0.9"]) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    saved = Calibration.load(model / "calibration.json")
    assert saved == Calibration.load(out / "calibration.json")
    assert saved.operating_point == "sensitivity=0.9" and saved.iou_threshold == 0.1
    assert saved.fitted_on["split"] == "valid" and saved.valid["image_sensitivity"] >= 0.9
    assert metrics["threshold"] == saved.threshold == metrics["operating_point"]["threshold"]
    assert metrics["threshold_source"] == "operating_point" and metrics["iou_threshold"] == 0.1
    assert json.loads((out / "valid" / "metrics.json").read_text())["split"] == "valid"
    for level in ("box", "image"):
        assert metrics["calibration"][level]["after"]["ece"] is not None
    assert headline["threshold_source"] == "sensitivity=0.9" and headline["map10_50"] is not None
    assert "Operating point" in (out / "report.html").read_text()

    # The next evaluation, without an operating point, uses the one saved with the model.
    again = run_eval(model, synthetic_dataset, tmp_path / "ev2")
    assert again["threshold"] == saved.threshold
    assert again["operating_point"]["source"] == "saved with the model"
    assert "calibration" in again

    # predict defaults to it and reports the calibrated probability beside the score.
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(Path(synthetic_dataset).rglob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    predict = ["predict", "--model", str(model), str(images), "--out", str(tmp_path / "p"), "--no-images"]
    assert main(predict) == 0
    assert f"threshold {saved.threshold:.3g}" in capsys.readouterr().err
    for record in (tmp_path / "p" / "json" / "images").glob("*.json"):
        found = json.loads(record.read_text())["detections"]
        assert 0 <= found["image_probability"] <= 1 and found["operating_threshold"] == saved.threshold
        assert all(d["score"] >= saved.threshold and 0 <= d["probability"] <= 1 for d in found["detections"])


def test_ensemble_and_tta_evaluate_and_compare_without_touching_the_model(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path
):
    before = sorted(p.name for p in Path(tiny_boxes_hf_dir).iterdir())
    plain = run_eval(tiny_boxes_hf_dir, synthetic_dataset, tmp_path / "plain")
    fused = run_eval(
        tiny_boxes_hf_dir,
        synthetic_dataset,
        tmp_path / "fused",
        ["--model", str(tiny_boxes_hf_dir), "--tta", "hflip", "--operating-point", "f1",
         "--compare", str(tmp_path / "plain")],
    )  # fmt: skip
    assert "hflip" in fused["model"] and " + " in fused["model"]
    assert fused["n_images"] == plain["n_images"]
    assert sorted(p.name for p in Path(tiny_boxes_hf_dir).iterdir()) == before  # nothing saved there
    comparison = json.loads((tmp_path / "fused" / "comparison.json").read_text())
    assert set(comparison["differences"]) >= {"map50", "froc_score", "image_sensitivity", "image_specificity"}
    assert comparison["differences"]["map50"]["value"] == pytest.approx(fused["map50"] - plain["map50"])
    assert "Comparison" in (tmp_path / "fused" / "report.html").read_text()


def test_operating_point_on_the_valid_split_itself_decodes_it_once(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path
):
    before = sorted(p.name for p in Path(tiny_boxes_hf_dir).iterdir())
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", str(tiny_boxes_hf_dir), "--data", str(synthetic_dataset),
            "--split", "valid", "--out", str(out), "--bootstrap", "0", "--operating-point", "f1",
            "--no-save-calibration"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "valid" and metrics["threshold"] == metrics["best_f1_threshold"]
    assert (out / "predictions.jsonl").read_text() == (out / "valid" / "predictions.jsonl").read_text()
    assert sorted(p.name for p in Path(tiny_boxes_hf_dir).iterdir()) == before  # --no-save-calibration


def test_an_unreadable_image_is_skipped_counted_and_named(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path, capsys
):
    """One truncated image used to stop the evaluation, naming the image but not its record."""
    from paligemma_xray.data import open_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    record = open_dataset(data).records("test")[1]
    record.image.write_bytes(record.image.read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--model",
        str(tiny_boxes_hf_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--bootstrap",
        "0",
        "--max-new-tokens",
        "8",
        "--no-progress",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_records"]["count"] == 1
    assert metrics["skipped_records"]["records"][0].startswith(f"{record.source}:{record.line}: ")
    n_test = len(open_dataset(data).records("test"))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == n_test - 1
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "strict"), "--max-bad-records", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{record.source}:{record.line}:" in err and "--max-bad-records 0" in err
    assert "Traceback" not in err
