"""`paligemma-xray predict`: per-image JSON, COCO results, annotated PNGs, resume, answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.cli import main


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "xrays"
    (root / "b").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a1.png", "b/b1.jpg", "b/b2.png"):
        Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_writes_everything_and_resumes(tiny_boxes_hf_dir, tiny_boxes, folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_boxes_hf_dir), str(folder), "--out", str(out), "--batch-size", "2"]
    assert main(args) == 0
    names = ["xrays/a1.png", "xrays/b/b1.jpg", "xrays/b/b2.png"]
    n_boxes = 0
    for name in names:
        record = json.loads((out / "json" / f"{name}.json").read_text())
        assert record["detections"]["image_size"] == [200, 120]
        boxes = np.array([d["box"] for d in record["detections"]["detections"]]).reshape(-1, 4)
        expected = np.array([[x1 * 200, y1 * 120, x2 * 200, y2 * 120] for x1, y1, x2, y2 in tiny_boxes])
        # The first box always, the second (taught on 3 of 4 images) where the model goes on.
        assert 1 <= len(boxes) <= 2
        np.testing.assert_allclose(boxes, expected[: len(boxes)], atol=3)  # within a bin or so
        n_boxes += len(boxes)
        assert all(0 < d["score"] <= 1 for d in record["detections"]["detections"])
        assert Image.open(out / "annotated" / f"{name}.png").size == (200, 120)
    results = json.loads((out / "predictions.coco.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images] == names
    assert len(results) == n_boxes and {r["category_id"] for r in results} == {1}
    assert "predicted 3 image(s)" in capsys.readouterr().err

    # Resume: only the image whose JSON is missing is done again.
    (out / "json" / "xrays/b/b1.jpg.json").unlink()
    assert main([*args, "--resume"]) == 0
    assert "predicted 1 image(s)" in capsys.readouterr().err
    assert (out / "json" / "xrays/b/b1.jpg.json").is_file()
    assert len(json.loads((out / "predictions.coco.json").read_text())) == n_boxes

    # The highest threshold keeps only certain boxes (a threshold above 1 is a user error).
    assert main([*args, "--out", str(tmp_path / "high"), "--threshold", "1", "--no-images"]) == 0
    kept = json.loads((tmp_path / "high" / "predictions.coco.json").read_text())
    assert len(kept) < n_boxes and all(r["score"] >= 1 for r in kept)
    assert not (tmp_path / "high" / "annotated").exists()


def test_predict_free_form_prints_answers(tiny_hf_dir, folder, tmp_path, capsys):
    out = tmp_path / "answers"
    code = main(
        [
            "predict",
            "--model",
            str(tiny_hf_dir),
            str(folder / "a1.png"),
            str(folder / "b"),
            "--prompt",
            "caption en",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["a1.png", "b/b1.jpg", "b/b2.png"]
    record = json.loads((out / "json" / "a1.png.json").read_text())
    assert "detections" not in record and len(record["tokens"]) <= 3


def test_predict_missing_path_is_a_user_error(tiny_hf_dir, tmp_path, capsys):
    assert main(["predict", "--model", str(tiny_hf_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--threshold", "2"], "threshold is a score between 0 and 1"),
        (["--max-new-tokens", "0"], "max new tokens must be at least 1"),
    ],
)
def test_predict_bad_numbers_are_user_errors(tiny_hf_dir, folder, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_hf_dir), str(folder), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err  # used to be accepted (--threshold 2 kept nothing)
    assert not out.exists()


def test_predict_empty_folder_and_file_as_output_are_user_errors(tiny_hf_dir, folder, tmp_path, capsys):
    model = ["predict", "--model", str(tiny_hf_dir)]
    (tmp_path / "empty").mkdir()
    assert main([*model, str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err  # used to "succeed" with 0 images
    (tmp_path / "taken").write_text("")
    assert main([*model, str(folder), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "taken: exists and is not a folder" in err and "Traceback" not in err


def test_folder_walk_finds_dicom_files_without_an_extension(tmp_path):
    """Scanners write ``IM0001``-style names: they are found by their DICM header, not their name."""
    from dicom_builder import write_dicom

    from paligemma_xray.infer.predict import iter_inputs

    scans = tmp_path / "scans"
    scans.mkdir()
    digital_xray = "1.2.840.10008.5.1.4.1.1.1.1"
    write_dicom(scans / "IM0001", np.arange(64, dtype=np.uint16).reshape(8, 8), sop_class=digital_xray)
    (scans / "README").write_text("not an image")
    (scans / "x.png").write_bytes(b"")

    assert [item.name for item in iter_inputs([scans])] == ["scans/IM0001", "scans/x.png"]


def test_manifest_records_the_dtype_and_resume_refuses_another(tiny_boxes_hf_dir, folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_boxes_hf_dir), str(folder), "--out", str(out), "--no-images"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    (out / "json" / "xrays/a1.png.json").unlink()
    capsys.readouterr()
    # float32 answers mixed into bfloat16 ones would differ a little, silently: refused.
    assert main([*args, "--dtype", "float32", "--resume"]) == 2
    assert "dtype 'bfloat16' then, 'float32' now" in capsys.readouterr().err
    assert main([*args, "--dtype", "bfloat16", "--resume"]) == 0


def test_a_failed_predict_does_not_block_its_rerun(tiny_hf_dir, folder, tmp_path, capsys):
    out = tmp_path / "out"
    bad = folder / "a1.png"  # the first image: the run fails before any result is written
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")  # ... but after its manifest
    args = ["predict", "--model", str(tiny_hf_dir), str(folder), "--out", str(out), "--no-images"]
    assert main(args) == 2
    assert "a1.png" in capsys.readouterr().err
    bad.write_bytes(good)
    assert main(args) == 0  # used to be refused: "the output folder is not empty"
    assert "predicted 3 image(s)" in capsys.readouterr().err
    # A folder holding results is still refused without --resume / --overwrite.
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
