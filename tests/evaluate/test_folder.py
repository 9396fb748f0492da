"""The evaluation folder (evaluate/folder.py): what `evaluate` writes is what the report reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paligemma_xray.errors import DataError
from paligemma_xray.evaluate.folder import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    dataset_classes,
    holds_evaluation,
    load_metrics,
    load_predictions,
    save_evaluation,
)
from paligemma_xray.locations import Detections


def _row(index: int) -> dict:
    truth = Detections.from_json(
        {"image_size": [64, 48], "detections": [{"box": [1, 2, 30, 40], "label": "fracture", "class_id": 0}]}
    )
    found = Detections.from_json(
        {
            "image_size": [64, 48],
            "detections": [{"box": [2, 2, 31, 40], "label": "fracture", "class_id": 0, "score": 0.75}],
        }
    )
    return {
        "index": index,
        "image": f"/data/{index}.png",
        "prompt": "detect fracture",
        "text": "",
        "finished": True,
        "ground_truth": truth.to_json(),
        "prediction": found.to_json(),
    }


def test_what_is_saved_is_what_is_loaded(tmp_path):
    assert not holds_evaluation(tmp_path)
    rows = [_row(0), _row(1)]
    save_evaluation(tmp_path, rows, {"map50": 0.5, "classes": ["fracture"]})
    assert holds_evaluation(tmp_path)
    assert load_metrics(tmp_path) == {"map50": 0.5, "classes": ["fracture"]}
    loaded = load_predictions(tmp_path)
    assert [row["image"] for row in loaded] == ["/data/0.png", "/data/1.png"]
    np.testing.assert_allclose(loaded[1]["prediction"].xyxy, [[2, 2, 31, 40]])
    assert loaded[0]["ground_truth"].score is None and loaded[0]["prediction"].score[0] == pytest.approx(0.75)
    coco = json.loads((tmp_path / "ground_truth.coco.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == ["/data/0.png", "/data/1.png"]


def test_a_damaged_folder_is_an_error_naming_file_and_line(tmp_path):
    save_evaluation(tmp_path, [_row(0), _row(1)], {"classes": ["fracture"]})
    path = tmp_path / PREDICTIONS_FILE
    lines = path.read_text().splitlines()
    path.write_text(f"{lines[0]}\n{{cut short\n")
    with pytest.raises(DataError) as caught:
        load_predictions(tmp_path)
    assert str(caught.value).startswith(f"{path}:2: ")
    (tmp_path / METRICS_FILE).write_text("[]")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_metrics(tmp_path)
    with pytest.raises(DataError, match="run `paligemma-xray evaluate` first"):
        load_metrics(tmp_path / "nowhere")


def test_classes_in_order_of_first_appearance():
    prefixes = ["detect fracture", "detect cast ; fracture", "caption en"]
    assert dataset_classes(prefixes) == ["fracture", "cast"]
