"""The synthetic fracture set: deterministic, in the Roboflow layout, and learnable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.data import open_dataset, record_targets
from paligemma_xray.data.synth import generate, render
from paligemma_xray.errors import DataError


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", n=5, seed=7, size=96, progress=False)
    b = generate(tmp_path / "b", n=5, seed=7, size=96, progress=False)
    c = generate(tmp_path / "c", n=5, seed=8, size=96, progress=False)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_fixture_is_a_clean_roboflow_set_with_positives_negatives_and_splits(synthetic_dataset):
    folder = synthetic_dataset / "dataset"
    assert {p.name for p in folder.glob("*.jsonl")} == {
        "_annotations.train.jsonl",
        "_annotations.valid.jsonl",
        "_annotations.test.jsonl",
    }
    ds = open_dataset(synthetic_dataset)
    assert ds.layout == "roboflow" and ds.problems == []
    assert [len(ds.records(s)) for s in ("train", "valid", "test")] == [16, 4, 4]
    counts = []
    for record in [r for s in ds.splits.values() for r in s]:
        assert record.prefix == "detect fracture"
        with Image.open(record.image) as image:
            assert image.size == (224, 224)
        targets = record_targets(record, (224, 224))
        assert set(targets.class_name) <= {"fracture"} and sum(targets.parse_issues.values()) == 0
        counts.append(len(targets))
    assert 0 in counts and 1 in counts  # negatives (empty suffix) and positives
    assert all(c <= 2 for c in counts)


def test_many_seeds_give_negatives_singles_and_pairs():
    counts = [len(render(seed=11, index=i, size=64)[1]) for i in range(60)]
    assert {0, 1, 2} <= set(counts)
    assert 0.1 < counts.count(0) / len(counts) < 0.5


def test_fracture_box_is_darker_than_the_same_bone_without_the_fracture():
    """The label matches something visible: the gap lowers brightness inside the box,
    even after the downscale to 112 px a small model sees."""
    found = 0
    for index in range(40):
        image, boxes, _ = render(seed=5, index=index, size=224)
        if len(boxes) != 1:
            continue
        small = np.asarray(image.resize((112, 112), Image.BILINEAR), dtype=np.float32)
        x1, y1, x2, y2 = (boxes[0] / 2).round().astype(int)
        patch = small[y1:y2, x1:x2]
        # A fracture gap is a line of pixels much darker than the bright cortex around it.
        assert patch.max() - patch.min() > 40, f"image {index}: flat box {boxes[0]}"
        found += 1
    assert found >= 10


def test_boxes_lie_inside_the_image_and_are_not_degenerate():
    for index in range(30):
        _, boxes, labels = render(seed=2, index=index, size=128)
        assert len(labels) == len(boxes)
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            assert (x2 - x1) * (y2 - y1) < 0.5 * 128 * 128


def test_jsonl_lines_are_roboflow_records(tmp_path):
    root = generate(tmp_path, n=4, seed=1, size=64, image_format="png", progress=False)
    lines = [json.loads(x) for p in (root / "dataset").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert set(line) == {"image", "prefix", "suffix"}
        assert (root / "dataset" / line["image"]).is_file() and line["image"].endswith(".png")


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"size": 8}, {"splits": (("train", 0.0),)}])
def test_bad_arguments_raise_data_error(tmp_path, kwargs):
    args = {"n": 2, "seed": 0, "size": 64, "progress": False, **kwargs}
    with pytest.raises(DataError):
        generate(tmp_path, **args)


def test_an_output_that_is_a_file_is_a_user_error(tmp_path):
    from paligemma_xray.errors import PaligemmaXrayError

    (tmp_path / "taken").write_text("")
    with pytest.raises(PaligemmaXrayError, match="not a folder"):  # was NotADirectoryError
        generate(tmp_path / "taken", n=2, size=64, progress=False)
