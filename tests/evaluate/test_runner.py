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
    ],
)
def test_evaluate_mistakes_are_user_errors_and_write_nothing(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys, flags, message
):
    empty = tmp_path / "empty"
    (empty / "dataset").mkdir(parents=True)
    (empty / "dataset" / "_annotations.train.jsonl").write_text("")
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    out = tmp_path / "o"
    argv = ["evaluate", "--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--out", str(out)]
    assert main([*argv, "--bootstrap", "0", *flags]) == 2
    assert message in capsys.readouterr().err  # each used to run and write metrics.json
    assert not out.exists()
