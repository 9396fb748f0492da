"""``metrics.jsonl``: the one reader and its policy (train/logs.py)."""

from __future__ import annotations

import json

import pytest

from paligemma_xray.errors import DataError
from paligemma_xray.train.logs import METRICS_LOG, MetricsLog, last_record, read_metrics

RECORDS = [
    {"kind": "train", "step": 1, "loss": 2.0},
    {"kind": "eval", "step": 1, "val_loss": 1.5},
    {"kind": "train", "step": 2, "loss": 1.0},
]


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def test_reads_what_the_training_log_writes(tmp_path):
    log = MetricsLog(tmp_path, 0, main=True)
    for record in RECORDS:
        log.write(record)
    log.close()
    read = read_metrics(tmp_path)  # the run folder or the file itself
    assert [{k: v for k, v in r.items() if k != "time"} for r in read] == RECORDS
    assert read_metrics(tmp_path / METRICS_LOG) == read
    assert last_record(read, "train")["loss"] == 1.0 and last_record(read, "eval")["val_loss"] == 1.5
    assert last_record(read, "early_stop") == {}


def test_a_killed_runs_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / METRICS_LOG
    path.write_text(_lines(RECORDS) + '{"kind": "train", "st')  # killed while writing
    assert read_metrics(path) == RECORDS
    path.write_text(_lines(RECORDS) + "\n\n")  # blank lines are nothing
    assert read_metrics(path) == RECORDS


@pytest.mark.parametrize(
    "text, line",
    [
        (_lines(RECORDS[:1]) + "{not json\n" + _lines(RECORDS[1:]), 2),  # a broken line in the middle
        (_lines(RECORDS) + '{"kind": "train", "st\n', 4),  # a broken last line that was finished
        (_lines(RECORDS[:2]) + "[1, 2]\n", 3),  # JSON, but not a record
    ],
)
def test_any_other_bad_line_is_an_error_naming_file_and_line(tmp_path, text, line):
    path = tmp_path / METRICS_LOG
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_metrics(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_a_folder_without_a_log(tmp_path):
    with pytest.raises(DataError, match="not a training run folder") as caught:
        read_metrics(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / METRICS_LOG}: ")
    assert read_metrics(tmp_path, missing_ok=True) == []  # the live page before the first line
