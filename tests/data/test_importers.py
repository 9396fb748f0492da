"""data import: COCO / YOLO / VOC to the Roboflow layout; boxes survive within one bin."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.data import open_dataset, record_targets
from paligemma_xray.data.importers import import_dataset
from paligemma_xray.errors import DataError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import supervision as sv

CLASSES = ["fracture", "plate"]
SIZE = (160, 120)
BOXES = {
    "train": {
        "a.jpg": ([[10.3, 12.7, 80.2, 60.9], [90.0, 5.0, 159.0, 119.0]], [0, 1]),
        "b.jpg": ([], []),
    },
    "valid": {"c.jpg": ([[33.3, 44.4, 55.5, 66.6]], [0])},
}


def _source(tmp_path, fmt):
    """Write the reference boxes with supervision's own writers, in Roboflow's export layout."""
    src = tmp_path / f"src_{fmt}"
    for split, items in BOXES.items():
        folder = src / split
        images_dir = folder / "images" if fmt == "yolo" else folder
        images_dir.mkdir(parents=True)
        paths, annotations = [], {}
        for name, (xyxy, ids) in items.items():
            path = images_dir / name
            # Distinct content per image, or data check would rightly call them duplicates.
            noise = np.random.default_rng(ord(name[0])).integers(0, 255, (*SIZE[::-1], 3))
            Image.fromarray(noise.astype(np.uint8)).save(path)
            paths.append(str(path))
            annotations[str(path)] = sv.Detections(
                xyxy=np.array(xyxy, dtype=np.float32).reshape(-1, 4), class_id=np.array(ids, dtype=int)
            )
        dataset = sv.DetectionDataset(CLASSES, paths, annotations)
        if fmt == "coco":
            dataset.as_coco(annotations_path=str(folder / "_annotations.coco.json"))
        elif fmt == "yolo":
            dataset.as_yolo(
                annotations_directory_path=str(folder / "labels"), data_yaml_path=str(src / "data.yaml")
            )
        else:
            dataset.as_pascal_voc(annotations_directory_path=str(folder))
    return src


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_round_trip_keeps_boxes_within_one_location_bin(tmp_path, fmt):
    src = _source(tmp_path, fmt)
    result = import_dataset(fmt, src, tmp_path / "out", progress=False)
    assert result.classes == CLASSES
    ds = open_dataset(tmp_path / "out")
    assert ds.layout == "roboflow" and ds.problems == []
    bin_w, bin_h = SIZE[0] / 1023, SIZE[1] / 1023
    for split, items in BOXES.items():
        records = {r.image.name: r for r in ds.records(split)}
        assert set(records) == set(items)
        for name, (xyxy, ids) in items.items():
            record = records[name]
            assert record.prefix == "detect fracture ; plate"
            targets = record_targets(record, SIZE)
            assert targets.class_id.tolist() == ids
            if xyxy:
                # VOC stores whole pixels, YOLO 6 decimals: beyond that, at most one bin apart.
                slack = 1.0 if fmt == "voc" else 0.01
                err = np.abs(targets.xyxy - np.array(xyxy, dtype=np.float32))
                assert (err[:, [0, 2]] <= bin_w + slack).all() and (err[:, [1, 3]] <= bin_h + slack).all()
            else:
                assert record.suffix == ""


def test_cli_import_then_check(tmp_path, capsys):
    src = _source(tmp_path, "coco")
    assert main(["data", "import", "--format", "coco", str(src), str(tmp_path / "out")]) == 0
    assert "detect fracture ; plate" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "out")]) == 0


def test_unused_classes_stay_out_of_the_prefix(tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    Image.new("RGB", SIZE).save(src / "x.jpg")
    detections = sv.Detections(xyxy=np.array([[1.0, 2.0, 30.0, 40.0]]), class_id=np.array([1]))
    sv.DetectionDataset(
        ["bones-supercategory", "fracture"], [str(src / "x.jpg")], {str(src / "x.jpg"): detections}
    ).as_coco(annotations_path=str(src / "_annotations.coco.json"))
    result = import_dataset("coco", src, tmp_path / "out", progress=False)
    assert result.classes == ["fracture"] and result.dropped_classes == ["bones-supercategory"]
    assert open_dataset(tmp_path / "out").records("train")[0].prefix == "detect fracture"


def test_nothing_to_import_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for fmt in ("coco", "yolo", "voc"):
        with pytest.raises(DataError) as info:
            import_dataset(fmt, tmp_path / "empty", tmp_path / "out", progress=False)
        assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(DataError, match="unknown format"):
        import_dataset("csv", tmp_path / "empty", tmp_path / "out", progress=False)


def test_a_bad_image_stops_the_import_before_anything_is_written(tmp_path, capsys):
    src = _source(tmp_path, "coco")
    good = (src / "valid" / "c.jpg").read_bytes()
    (src / "valid" / "c.jpg").write_bytes(good[: len(good) // 2])  # truncated
    assert main(["data", "import", "--format", "coco", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "c.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # used to hold the train split's images and JSONL


def test_output_that_is_a_file_is_a_user_error(tmp_path, capsys):
    src = _source(tmp_path, "coco")
    (tmp_path / "taken").write_text("")
    assert main(["data", "import", "--format", "coco", str(src), str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "taken: exists and is not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_an_annotation_without_its_image_is_refused(tmp_path, fmt, capsys):
    src = _source(tmp_path, fmt)
    image = src / "valid" / ("images" if fmt == "yolo" else "") / "c.jpg"
    image.unlink()  # its label / XML stays: used to be dropped without a word
    annotation = src / "valid" / ("labels/c.txt" if fmt == "yolo" else "c.xml")
    assert main(["data", "import", "--format", fmt, str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{annotation}:" in err and "no image" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "dataset").exists()


def test_yolo_boxes_past_the_edge_or_without_area_are_named_in_the_summary(tmp_path, capsys):
    src = _source(tmp_path, "yolo")
    label = src / "train" / "labels" / "a.txt"
    lines = label.read_text().splitlines()
    # line 3: centre at x = 1.2 (half outside); line 4: zero width
    label.write_text("\n".join([*lines, "0 1.2 0.5 0.5 0.2", "1 0.5 0.5 0.0 0.3"]) + "\n")
    result = import_dataset("yolo", src, tmp_path / "out", progress=False)
    assert result.counts["train"]["boxes"] == 3  # 2 + the clipped one; the empty one left out
    assert len(result.changes) == 2
    assert result.changes[0].startswith(f"{label}:3: ") and "clipped" in result.changes[0]
    assert result.changes[1].startswith(f"{label}:4: ") and "left out" in result.changes[1]
    summary = result.summary()
    assert "1 clipped to the image, 1 without area left out" in summary
    assert all(change in summary for change in result.changes)
    record = next(r for r in open_dataset(tmp_path / "out").records("train") if r.image.name == "a.jpg")
    boxes = record_targets(record, SIZE).xyxy
    assert len(boxes) == 3 and boxes[:, 2].max() <= SIZE[0] and boxes[:, 0].min() >= 0


def test_voc_box_past_the_edge_is_clipped_and_named(tmp_path):
    src = _source(tmp_path, "voc")
    xml = src / "valid" / "c.xml"
    text = xml.read_text()
    assert text.count("<xmax>") == 1
    start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:start] + "400" + text[text.index("</xmax>") :])  # the image is 160 wide
    result = import_dataset("voc", src, tmp_path / "out", progress=False)
    line = next(n for n, t in enumerate(xml.read_text().splitlines(), 1) if "<object" in t)
    assert len(result.changes) == 1, result.changes
    assert (
        result.changes[0].startswith(f"{xml}:{line}: box (")
        and "clipped to the 160x120 image" in result.changes[0]
    )


def test_coco_unknown_category_names_the_id_and_the_annotation(tmp_path, capsys):
    import json

    src = _source(tmp_path, "coco")
    path = src / "train" / "_annotations.coco.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 77
    path.write_text(json.dumps(data))
    assert main(["data", "import", "--format", "coco", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    annotation_id = data["annotations"][0]["id"]
    assert f"{path}: annotation id {annotation_id}" in err and "category_id 77" in err
    assert "Traceback" not in err
