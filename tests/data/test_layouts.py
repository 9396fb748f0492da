"""open_dataset: the three layouts, records with file and line, bad lines as problems."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from paligemma_xray.data import open_dataset, record_targets
from paligemma_xray.errors import DataError

BOX = "<loc0100><loc0200><loc0300><loc0400> fracture"


def _image(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 90).save(path)
    return path


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(image, suffix=BOX, prefix="detect fracture"):
    return {"image": image, "prefix": prefix, "suffix": suffix}


def test_roboflow_layout_from_root_and_from_dataset_folder(tmp_path):
    folder = tmp_path / "export" / "dataset"
    for split in ("train", "valid", "test"):
        _image(folder / f"{split}.jpg")
        _jsonl(folder / f"_annotations.{split}.jsonl", [_row(f"{split}.jpg")])
    for root in (tmp_path / "export", folder):
        ds = open_dataset(root)
        assert ds.layout == "roboflow" and list(ds.splits) == ["train", "valid", "test"]
        record = ds.records("valid")[0]
        assert record.image == (folder / "valid.jpg").resolve()
        assert record.source == (folder / "_annotations.valid.jsonl").resolve() and record.line == 1
        assert ds.records("val") == ds.records("valid")
    with pytest.raises(DataError, match="no split 'extra'"):
        ds.records("extra")


def test_maestro_layout_images_beside_each_split(tmp_path):
    for split in ("train", "valid"):
        _image(tmp_path / split / "a.png")
        _jsonl(tmp_path / split / "annotations.jsonl", [_row("a.png"), _row("a.png", suffix="")])
    ds = open_dataset(tmp_path)
    assert ds.layout == "maestro" and set(ds.splits) == {"train", "valid"}
    assert [r.line for r in ds.records("train")] == [1, 2]
    assert ds.records("train")[0].image == (tmp_path / "train" / "a.png").resolve()


def test_plain_jsonl_file_and_folder_with_images_folder(tmp_path):
    _image(tmp_path / "images" / "x.jpg")
    path = _jsonl(tmp_path / "test.jsonl", [_row("x.jpg")])
    single = open_dataset(path)
    assert single.layout == "jsonl" and list(single.splits) == ["test"]
    assert single.records("test")[0].image == (tmp_path / "images" / "x.jpg").resolve()
    folder = open_dataset(tmp_path)
    assert folder.layout == "jsonl" and len(folder) == 1
    other = tmp_path / "elsewhere"
    shutil.move(tmp_path / "images", other)
    assert open_dataset(path, image_dir=other).problems == []


def test_every_bad_line_is_a_problem_with_file_and_line(tmp_path):
    folder = tmp_path / "dataset"
    _image(folder / "ok.jpg")
    _image(folder / "other.jpg")
    _image(folder / "third.jpg")
    rows = [
        _row("ok.jpg"),  # 1 fine
        '{"image": "ok.jpg", "prefix": "detect fracture", ',  # 2 bad JSON
        {"image": "ok.jpg", "prefix": "detect fracture"},  # 3 no suffix
        _row("gone.jpg"),  # 4 missing image
        _row("ok.jpg", suffix="fracture near the wrist"),  # 5 not loc boxes
        _row("ok.jpg", suffix="<loc0100><loc0200><loc1200><loc0400> fracture"),  # 6 out of range
        _row("ok.jpg", suffix="<loc0500><loc0200><loc0300><loc0400> fracture"),  # 7 inverted
        _row("other.jpg", suffix="<loc0100><loc0200><loc0300><loc0400> tumour"),  # 8 unknown label
        "",  # 9 blank: no record, no problem
        "[1, 2]",  # 10 not an object
        _row("ok.jpg", suffix="<loc0100><loc0200><loc0300> fracture"),  # 11 truncated box
        _row("third.jpg", suffix=BOX + " ; ; " + BOX),  # 12 stray separator: a warning
        {"image": 5, "prefix": "detect fracture", "suffix": ""},  # 13 wrong type
    ]
    source = _jsonl(folder / "_annotations.train.jsonl", rows)
    ds = open_dataset(tmp_path)
    found = {(p.line, p.kind) for p in ds.problems}
    assert found == {
        (2, "bad_json"),
        (3, "missing_key"),
        (4, "missing_image"),
        (5, "malformed_suffix"),
        (6, "out_of_range"),
        (7, "inverted_box"),
        (8, "unknown_label"),
        (10, "bad_record"),
        (11, "malformed_suffix"),
        (12, "malformed_suffix"),
        (13, "bad_value"),
    }
    assert all(p.path == source.resolve() for p in ds.problems)
    assert all(str(source.resolve()) in str(p) for p in ds.problems)
    # Usable lines stay (warnings: unknown label, stray separator); broken ones are left out.
    assert [r.line for r in ds.records("train")] == [1, 8, 12]
    assert record_targets(ds.records("train")[1], (64, 48)).class_id.tolist() == [-1]


def test_duplicate_listing_is_a_warning_and_negatives_are_fine(tmp_path):
    _image(tmp_path / "dataset" / "a.jpg")
    _jsonl(tmp_path / "dataset" / "_annotations.train.jsonl", [_row("a.jpg", suffix=""), _row("a.jpg")])
    ds = open_dataset(tmp_path)
    assert [(p.kind, p.line, p.severity) for p in ds.problems] == [("duplicate_record", 2, "warning")]
    assert len(record_targets(ds.records("train")[0], (64, 48))) == 0


def test_record_targets_in_pixels():
    ds_box = "<loc0000><loc0000><loc1023><loc0511> a ; <loc0100><loc0100><loc0200><loc0200> b"
    from pathlib import Path

    from paligemma_xray.data import Record

    record = Record(Path("/x.jpg"), "detect a ; b", ds_box, "train", Path("/t.jsonl"), 1)
    targets = record_targets(record, (1023, 2046))
    assert targets.class_id.tolist() == [0, 1]
    assert targets.xyxy[0].tolist() == pytest.approx([0, 0, 511, 2046])


def test_no_data_set_is_a_data_error_naming_the_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no data set found") as info:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing")


def test_usable_records_warn_about_dropped_lines_and_refuse_an_empty_split(tmp_path, caplog):
    folder = tmp_path / "dataset"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.jpg")
    good = json.dumps({"image": "a.jpg", "prefix": "detect fracture", "suffix": ""})
    (folder / "_annotations.train.jsonl").write_text(good + "\n{broken\n")
    (folder / "_annotations.valid.jsonl").write_text(json.dumps({"image": "a.jpg", "suffix": ""}) + "\n")
    dataset = open_dataset(tmp_path)
    with caplog.at_level("WARNING"):
        assert len(dataset.usable("train")) == 1
    assert "_annotations.train.jsonl:2" in caplog.text  # training used to drop it silently
    with pytest.raises(DataError, match=r"no usable record.*_annotations\.valid\.jsonl:1.*prefix"):
        dataset.usable("valid")
    with pytest.raises(DataError, match="no split 'test'"):
        dataset.usable("test")


def test_images_outside_the_data_set_are_refused_unless_allowed(tmp_path):
    """``../..``, absolute paths and symlinks out of the folder used to be read and trained on."""
    secret = _image(tmp_path / "elsewhere" / "secret.jpg")
    root = tmp_path / "set"
    _image(root / "inside.jpg")
    (root / "link.jpg").symlink_to(secret)
    _jsonl(
        root / "train.jsonl",
        [_row("inside.jpg"), _row("../elsewhere/secret.jpg"), _row(str(secret)), _row("link.jpg")],
    )
    ds = open_dataset(root)
    assert [r.image.name for r in ds.records("train")] == ["inside.jpg"]
    outside = [p for p in ds.problems if p.kind == "outside_image"]
    assert [(p.line, p.severity) for p in outside] == [(2, "error"), (3, "error"), (4, "error")]
    assert all(p.path == (root / "train.jsonl").resolve() for p in outside)
    allowed = open_dataset(root, allow_outside_images=True)
    assert [r.image for r in allowed.records("train")][1:] == [secret.resolve()] * 3
    # A plain JSONL's image_dir counts as inside.
    listed = _jsonl(tmp_path / "list" / "train.jsonl", [_row("secret.jpg")])
    assert len(open_dataset(listed, image_dir=secret.parent).records("train")) == 1


def test_symlink_loops_are_problems_not_crashes(tmp_path, capsys):
    from paligemma_xray.cli import main

    root = tmp_path / "set"
    _image(root / "ok.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "sub").symlink_to(root / "sub")
    _jsonl(root / "train.jsonl", [_row("ok.jpg"), _row("loop.jpg"), _row("sub/x.jpg")])
    ds = open_dataset(root)
    assert len(ds.records("train")) == 1
    assert [(p.kind, p.line) for p in ds.problems] == [("missing_image", 2), ("missing_image", 3)]
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr()
    assert "train.jsonl:2" in out.out and "Traceback" not in out.err
    (tmp_path / "looped").symlink_to(tmp_path / "looped")
    assert main(["data", "check", str(tmp_path / "looped")]) == 2
    assert "Traceback" not in capsys.readouterr().err
