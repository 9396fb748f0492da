"""Validation during training is ``paligemma-xray evaluate``: same Detector, same figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.locations import encode
from paligemma_xray.train import resolve, run


def _boxes_set(root: Path, boxes) -> Path:
    """Six noise images; the valid answers mix what the model says, part of it, and misses."""
    folder = root / "dataset"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    answers = [list(boxes), list(boxes[:1]), list(boxes[1:]), [], [(0.05, 0.05, 0.2, 0.2)], list(boxes)]
    rows = []
    for i, answer in enumerate(answers):
        name = f"noise_{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 128), dtype=np.uint8)).save(folder / name)
        suffix = encode(
            [[v * s for v, s in zip(b, (128, 96, 128, 96))] for b in answer],
            ["fracture"] * len(answer),
            (128, 96),
        )
        rows.append({"image": name, "prefix": "detect fracture", "suffix": suffix})
    for split in ("train", "valid"):
        (folder / f"_annotations.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_last_step_map_is_what_evaluate_reports_for_last(tiny_boxes_hf_dir, tiny_boxes, tmp_path) -> None:
    data = _boxes_set(tmp_path / "data", tiny_boxes)
    out = tmp_path / "run"
    flags = {"examples": 4, "batch_size": 4, "lr": 1e-4, "eval_batch_size": 4, "eval_max_new_tokens": 24}
    # The same procedure in the same precision: float32 (precision auto is bf16 autocast on a
    # CPU with native bf16, and autocast over mixed weights is not evaluate's bf16 model).
    flags["precision"] = "float32"
    run(
        resolve(
            overrides={
                "model": str(tiny_boxes_hf_dir),
                "data": str(data),
                "out": str(out),
                **flags,
                "progress": False,
            }
        )
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "eval"][-1]
    argv = ["evaluate", "--model", str(out / "last"), "--data", str(data), "--split", "valid"]
    argv += ["--dtype", "float32"]  # evaluate would pick bf16 on a CPU with native bf16
    argv += [
        "--out",
        str(tmp_path / "eval"),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "24",
        "--bootstrap",
        "0",
    ]
    assert main(argv) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 < evaluated["map50"] < 1  # boxes found and missed: a figure that can differ
    assert (trained["map50"], trained["map50_95"]) == (evaluated["map50"], evaluated["map50_95"])


def test_an_unreadable_valid_image_is_skipped_and_counted_up_to_max_bad_records(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys, caplog
) -> None:
    # Validation's loss used to read images with a bare load_image: one truncated image in
    # the valid split stopped a run hours in, whatever --max-bad-records said.
    import shutil

    from paligemma_xray.data import open_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    broken = open_dataset(data).records("valid")[1]
    broken.image.write_bytes(b"not a jpeg")
    argv = ["train", "--model", str(tiny_hf_dir), "--data", str(data), "--examples", "4", "--batch-size", "4",
            "--eval-max-new-tokens", "4", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "tolerant")]) == 0
    log = [json.loads(x) for x in (tmp_path / "tolerant" / "metrics.jsonl").read_text().splitlines()]
    (validation,) = [r for r in log if r["kind"] == "eval"]
    assert validation["val_skipped_records"] == 1 and validation["val_loss"] > 0
    assert f"{broken.source}:{broken.line}: record skipped" in caplog.text
    capsys.readouterr()

    assert main([*argv, "--out", str(tmp_path / "strict"), "--max-bad-records", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken.source}:{broken.line}: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
