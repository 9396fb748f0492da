"""data check: counts, every problem with file and line, leakage, JSON/HTML, exit codes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image, ImageOps

from paligemma_xray.cli import main
from paligemma_xray.data.check import augmentation_tag, check_dataset, source_key
from paligemma_xray.errors import DataError


@pytest.fixture()
def copy_of_synthetic(synthetic_dataset, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(synthetic_dataset, root)
    return root


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_clean_synthetic_set_counts_and_exit_zero(synthetic_dataset, tmp_path, capsys):
    report = check_dataset(synthetic_dataset, progress=False)
    assert report.exit_code == 0 and report.problems == []
    folder = synthetic_dataset / "dataset"
    for split in ("train", "valid", "test"):
        rows = _lines(folder / f"_annotations.{split}.jsonl")
        stats = report.stats[split]
        assert stats["images"] == len(rows)
        assert stats["negatives"] == sum(r["suffix"] == "" for r in rows)
        assert stats["boxes"] == sum(r["suffix"].count("<loc") // 4 for r in rows)
        assert stats["classes"] == ({"fracture": stats["boxes"]} if stats["boxes"] else {})
    assert main(["data", "check", str(synthetic_dataset), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "train" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["ok"] is True and saved["splits"]["train"]["images"] == report.stats["train"]["images"]


def test_planted_problems_are_all_reported_with_file_and_line(copy_of_synthetic, tmp_path, capsys):
    folder = copy_of_synthetic / "dataset"
    train = folder / "_annotations.train.jsonl"
    rows = _lines(train)
    first = rows[0]["image"]
    (folder / rows[1]["image"]).write_bytes(b"\xff\xd8\xff garbage, not a JPEG")  # line 2
    rows[2]["suffix"] = "<loc0900><loc0100><loc0200><loc0300> fracture"  # line 3 inverted
    rows[3]["suffix"] = "fracture"  # line 4 malformed
    rows[4]["image"] = "missing.jpg"  # line 5
    rows[5]["suffix"] = "<loc0100><loc0100><loc0200><loc0200> dislocation"  # line 6 unknown label
    _write(train, rows)
    with train.open("a") as f:
        f.write('{"image": "' + first + '", "prefix": "detect fracture"\n')  # bad JSON, last line
    n_lines = len(rows) + 1
    report = check_dataset(copy_of_synthetic, progress=False, json_path=tmp_path / "r.json")
    found = {(p.kind, p.line) for p in report.problems if p.path == train.resolve()}
    assert found == {
        ("undecodable_image", 2),
        ("inverted_box", 3),
        ("malformed_suffix", 4),
        ("missing_image", 5),
        ("unknown_label", 6),
        ("bad_json", n_lines),
    }
    assert report.exit_code == 1
    summary = report.summary()
    for kind, line in found:
        assert f"{train.resolve()}:{line}: " in summary and kind in summary
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {(p["kind"], p["line"]) for p in saved["problems"]} >= found
    assert main(["data", "check", str(copy_of_synthetic)]) == 1
    assert f"_annotations.train.jsonl:{n_lines}" in capsys.readouterr().out


def test_flipped_copy_and_exact_copy_across_splits_are_leakage(copy_of_synthetic):
    folder = copy_of_synthetic / "dataset"
    train_rows = _lines(folder / "_annotations.train.jsonl")
    test_file = folder / "_annotations.test.jsonl"
    test_rows = _lines(test_file)
    source_a, source_b = train_rows[0]["image"], train_rows[1]["image"]
    with Image.open(folder / source_a) as image:
        ImageOps.mirror(image).save(folder / "flip_copy.jpg", quality=80)
    shutil.copyfile(folder / source_b, folder / "plain_copy.jpg")
    test_rows += [
        {"image": "flip_copy.jpg", "prefix": "detect fracture", "suffix": ""},
        {"image": "plain_copy.jpg", "prefix": "detect fracture", "suffix": ""},
    ]
    _write(test_file, test_rows)
    report = check_dataset(copy_of_synthetic, progress=False)
    leaks = [p for p in report.problems if p.kind == "leakage"]
    assert {(p.line, p.path) for p in leaks} == {
        (len(test_rows) - 1, test_file.resolve()),
        (len(test_rows), test_file.resolve()),
    }
    by_line = {p.line: p.message for p in leaks}
    flipped = by_line[len(test_rows) - 1]
    assert "flip_copy.jpg" in flipped and source_a in flipped and "flip" in flipped
    assert "augmented-copy name" in flipped
    assert source_b in by_line[len(test_rows)] and "byte-identical" in by_line[len(test_rows)]
    assert len(report.leakage) == 2 and all(item["a"]["split"] == "train" for item in report.leakage)


def test_same_source_name_across_splits_is_flagged(copy_of_synthetic):
    folder = copy_of_synthetic / "dataset"
    test_file = folder / "_annotations.test.jsonl"
    rows = _lines(test_file)
    # Two different radiographs, but named as augmented copies of one source image.
    shutil.copyfile(folder / rows[0]["image"], folder / "wrist_jpg.rf.0123456789abcdef.jpg")
    train_rows = _lines(folder / "_annotations.train.jsonl")
    shutil.copyfile(folder / train_rows[0]["image"], folder / "rot_wrist_jpg.rf.fedcba9876543210.jpg")
    rows[0]["image"] = "wrist_jpg.rf.0123456789abcdef.jpg"
    train_rows[0]["image"] = "rot_wrist_jpg.rf.fedcba9876543210.jpg"
    _write(test_file, rows)
    _write(folder / "_annotations.train.jsonl", train_rows)
    report = check_dataset(copy_of_synthetic, progress=False)
    named = [p for p in report.problems if p.kind == "leakage_by_name"]
    assert len(named) == 1 and named[0].line == 1 and named[0].path == test_file.resolve()


def test_name_helpers():
    assert augmentation_tag("flip_0001.jpg") == "flip_"
    assert augmentation_tag("rot90-0001.jpg") == "rot90-"
    assert augmentation_tag("fracture_01.jpg") is None
    assert source_key("flip_a_jpg.rf.1234abcd5678.jpg") == source_key("a_jpg.rf.ffff0000aaaa.jpg")


def test_html_gallery_is_self_contained_with_boxes(synthetic_dataset, tmp_path):
    html = tmp_path / "check.html"
    assert main(["data", "check", str(synthetic_dataset), "--html", str(html), "--gallery", "3"]) == 0
    text = html.read_text()
    assert text.count("data:image/jpeg;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert "Training examples" in text


def test_unusable_input_exits_two_without_traceback(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "Traceback" not in err
    with pytest.raises(DataError):
        check_dataset(tmp_path / "nothing", progress=False)


def test_report_paths_that_cannot_be_written_are_user_errors(synthetic_dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for flag, target in (("--json", tmp_path), ("--html", tmp_path / "file" / "x.html")):
        assert main(["data", "check", str(synthetic_dataset), flag, str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(target) in err and "Traceback" not in err


def test_the_same_file_listed_in_two_splits_is_leakage(copy_of_synthetic):
    folder = copy_of_synthetic / "dataset"
    train_rows = _lines(folder / "_annotations.train.jsonl")
    valid_file = folder / "_annotations.valid.jsonl"
    valid_rows = _lines(valid_file)
    valid_rows.append(dict(train_rows[0]))  # the very file train lists, listed again in valid
    _write(valid_file, valid_rows)
    report = check_dataset(copy_of_synthetic, progress=False)
    leaks = [p for p in report.problems if p.kind == "leakage"]
    assert [(p.path, p.line) for p in leaks] == [(valid_file.resolve(), len(valid_rows))]
    assert "the same file as train image" in leaks[0].message and train_rows[0]["image"] in leaks[0].message
    assert report.exit_code == 1 and report.leakage[0]["a"]["split"] == "train"
