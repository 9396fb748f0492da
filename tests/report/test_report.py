"""The HTML report: self-contained, complete, worst cases first, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.evaluate.folder import save_evaluation
from paligemma_xray.evaluate.metrics import evaluate_detections
from paligemma_xray.locations import Detections
from paligemma_xray.report import write_report

SIZE = (160, 120)


def det(boxes, scores=None) -> Detections:
    n = len(boxes)
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        class_name=["fracture"] * n,
        class_id=np.zeros(n, np.int64),
        score=None if scores is None else np.array(scores, np.float32),
        seg_codes=-np.ones((n, 16), np.int16),
        image_size=SIZE,
    )


# name: (ground truth, predictions with scores)
CASES = {
    "found.png": ([[10, 10, 60, 60]], ([[12, 10, 60, 62]], [0.9])),
    "two_missed.png": ([[10, 10, 60, 60], [90, 50, 150, 110]], ([], [])),
    "false_alarm.png": ([], ([[20, 20, 50, 50]], [0.8])),
    "quiet.png": ([], ([], [])),
    "one_missed.png": ([[100, 20, 150, 80]], ([[0, 0, 30, 30]], [0.3])),
}


def make_eval(folder: Path, images: Path, shift: float = 0.0) -> Path:
    rows, truths, preds = [], [], []
    rng = np.random.default_rng(0)
    for index, (name, (truth, (boxes, scores))) in enumerate(CASES.items()):
        path = images / name
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(path)
        gt = det(truth)
        pred = det(np.array(boxes, np.float32).reshape(-1, 4) + shift, scores)
        truths.append(gt)
        preds.append(pred)
        rows.append(
            {
                "index": index,
                "image": str(path),
                "prompt": "detect fracture",
                "text": "",
                "finished": True,
                "ground_truth": gt.to_json(),
                "prediction": pred.to_json(),
            }
        )
    metrics = evaluate_detections(truths, preds, ["fracture"], threshold=0.5, bootstrap=50)
    metrics.update({"model": f"model-shift-{shift:g}", "data": "synthetic", "split": "test"})
    save_evaluation(folder, rows, metrics)
    return folder


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "images").mkdir()
    after = make_eval(root / "after", root / "images")
    before = make_eval(root / "before", root / "images", shift=25.0)
    run = root / "run"
    run.mkdir()
    run.joinpath("metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"kind": "train", "step": 1, "loss": 2.0},
                {"kind": "train", "step": 2, "loss": 1.2},
                {"kind": "eval", "step": 2, "val_loss": 1.4},  # as train/loop.py logs it,
            ]
        )
        + "\n"
    )
    return root, after, before, run


def test_report_is_self_contained_and_complete(evals):
    root, after, before, run = evals
    path = write_report(after, root / "r.html", run_dir=run, compare=before, names=("after", "before"))
    text = path.read_text()
    # No external asset of any kind: everything inline.
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//|file:)""", text)
    assert "<link" not in text and "@import" not in text
    assert not re.search(r"url\((?!#)", text)  # SVG refers to its own ids only
    assert text.count("<svg") == 3  # PR, FROC, loss
    assert text.count("data:image/jpeg;base64,") == 2 * len(CASES)  # gallery, both models
    metrics = json.loads((after / "metrics.json").read_text())
    assert f"{metrics['map50']:.3f}" in text
    low, high = metrics["ci95"]["recall"]
    assert f"[{low:.3f}, {high:.3f}]" in text
    assert "after" in text and "before" in text
    # Worst first: the two missed fractures, then one missed, then the false alarm.
    names = re.findall(r"<div class=name>([^<]+\.png)</div>", text)
    assert names[:3] == ["two_missed.png", "one_missed.png", "false_alarm.png"]


def test_report_without_compare_or_run_and_cli(evals, capsys):
    root, after, _, _ = evals
    assert main(["report", str(after), "--gallery", "2"]) == 0
    text = (after / "report.html").read_text()
    assert text.count("<svg") == 2 and text.count("data:image/jpeg;base64,") == 2
    assert main(["report", str(root / "nowhere")]) == 2
    assert "metrics.json" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_chromium(evals, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make browser)")
    _, after, before, run = evals
    path = write_report(after, tmp_path / "r.html", run_dir=run, compare=before)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tempfile.mkdtemp()}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1280)
    # The dark header band is drawn, and the page below it is not blank.
    assert pixels[:40].mean() < 120
    assert pixels[200:].std() > 20


def test_report_path_mistakes_are_user_errors(evals, tmp_path, capsys):
    _, after, _, _ = evals
    (tmp_path / "file").write_text("")
    broken = tmp_path / "broken"
    shutil.copytree(after, broken)
    (broken / "metrics.json").write_text("[]")
    cases = [
        [str(tmp_path / "file")],  # a file given as the evaluation folder
        [str(after), "--out", str(tmp_path)],  # a folder given as the HTML file
        [str(after), "--out", str(tmp_path / "file" / "r.html")],
        [str(broken)],  # metrics.json that is not an object
    ]
    for argv in cases:  # each used to end in a traceback
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_report_of_a_killed_run_drops_its_partial_last_line(evals, tmp_path, capsys):
    # A run killed mid-write leaves `{"kind": "tra` without a newline; the report used to
    # refuse the whole log, the live page to skip any bad line and the demo to crash.
    _, after, _, run = evals
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    log = killed / "metrics.jsonl"
    log.write_text(log.read_text() + '{"kind": "tra')
    text = write_report(after, tmp_path / "r.html", run_dir=killed).read_text()
    assert text.count("<svg") == 3  # PR, FROC and the loss curve
    log.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "tra\n{"kind": "eval", "step": 2}\n')
    assert main(["report", str(after), "--out", str(tmp_path / "r2.html"), "--run", str(killed)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {log}:2: ")


def test_the_report_reads_an_evaluation_without_torch_or_transformers(evals, tmp_path):
    # Reading JSON used to import torch and transformers (through evaluate.runner): seconds
    # and gigabytes for `paligemma-xray report` and the live training page.
    _, after, before, run = evals
    script = (
        "import sys\n"
        "from paligemma_xray.report import write_report\n"
        "import paligemma_xray.report.live\n"
        f"write_report({str(after)!r}, {str(tmp_path / 'r.html')!r}, run_dir={str(run)!r},"
        f" compare={str(before)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "r.html").is_file()
