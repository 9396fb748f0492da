"""`predict --resume` after a SIGKILL: the outputs are an uninterrupted run's.

Byte for byte, except where an image sits in a batch of other members than in the
uninterrupted run (the images left after a kill are batched afresh): its floats (log
probabilities, scores) are computed by a batch of another size and agree to rounding (the
5th decimal), its text, tokens and boxes are the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 24


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _same_to_rounding(a: object, b: object, where: str = "") -> list[str]:
    """Where two JSON values differ beyond float rounding (1e-4)."""
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= 1e-4
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [where]
        return [d for k in a for d in _same_to_rounding(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [where]
        pairs = zip(a, b, strict=True)
        return [d for i, (x, y) in enumerate(pairs) for d in _same_to_rounding(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


@pytest.mark.slow
def test_predict_killed_mid_run_then_resumed_equals_an_uninterrupted_run(tiny_boxes_hf_dir, tmp_path) -> None:
    images = tmp_path / "xrays"
    images.mkdir()
    rng = np.random.default_rng(3)
    for k in range(N_IMAGES):
        noise = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(images / f"img{k:02d}.png")
    # The same thread count in every run: float sums, hence scores, depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO / "src")}

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "paligemma_xray.cli", "predict", "--no-progress",
                "--model", str(tiny_boxes_hf_dir), str(images), "--out", str(out), "--batch-size", "2",
                *extra]  # fmt: skip

    reference = tmp_path / "reference"
    subprocess.run(command(reference), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "json").is_dir() and sum(1 for _ in (out / "json").rglob("*.json")) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "predict ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    # Nothing half-written under a final name: every result there is whole.
    done = sorted((out / "json").rglob("*.json"))
    assert 3 <= len(done) < N_IMAGES
    for path in done:
        assert json.loads(path.read_text())["name"]
    for path in (out / "annotated").rglob("*.png") if (out / "annotated").is_dir() else []:
        with Image.open(path) as image:
            image.load()

    resumed = subprocess.run(command(out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Nothing predicted twice: the resume did exactly the images without a result.
    already = len(list((out / "json").rglob("*.json")))
    assert already == N_IMAGES
    assert f"predicted {N_IMAGES - len(done)} image(s)" in resumed.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    expected, got = _files(reference), _files(out)
    assert expected.keys() == got.keys()
    differ = [name for name in expected if expected[name] != got[name]]
    for name in differ:
        if name.endswith(".json"):  # floats of a differently batched image: rounding only
            assert _same_to_rounding(json.loads(expected[name]), json.loads(got[name])) == [], name
        else:  # annotated PNGs: the same boxes drawn, pixel for pixel
            with Image.open(reference / name) as a, Image.open(out / name) as b:
                assert np.array_equal(np.asarray(a), np.asarray(b)), name
    # Images batched as in the uninterrupted run (most of them) are byte for byte the same.
    assert len(differ) <= 4, differ
