"""Checkpoint fingerprints: what `predict --resume` and `calibration.json` compare to refuse other weights."""

from __future__ import annotations

import json
import os

import pytest

from paligemma_xray.errors import CheckpointError
from paligemma_xray.model import fingerprint as fingerprint_module
from paligemma_xray.model.fingerprint import fingerprint


def _hf(folder, weights: bytes):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_fingerprint_follows_the_weights_load_reads_and_skips_the_rest(tmp_path):
    run = tmp_path / "run"
    _hf(run / "best", b"weights-1")
    _hf(run / "last", b"weights-0")
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "checkpoints" / "step-5" / "optimizer.pt").write_bytes(b"state")
    (run / "metrics.jsonl").write_text("{}\n")
    first = fingerprint(run)
    assert sorted(first["files"]) == ["config.json", "model.safetensors"]
    assert first == fingerprint(run / "best")  # the run is its best/
    assert first["sha256"] != fingerprint(run / "last")["sha256"]
    (run / "checkpoints" / "step-5" / "optimizer.pt").write_bytes(b"more state")
    (run / "metrics.jsonl").write_text("{}\n{}\n")
    (run / "best" / "calibration.json").write_text("{}")  # a calibration is not the weights
    (run / "best" / "model.npz").write_bytes(b"an export")
    assert fingerprint(run)["sha256"] == first["sha256"]
    (run / "best" / "model.safetensors").write_bytes(b"weights-2")  # same size, other weights
    assert fingerprint(run, previous=first)["sha256"] != first["sha256"]
    assert fingerprint(tmp_path / "hub-id-not-on-disk") is None
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        fingerprint(run / "checkpoints")


def test_trained_weights_count_with_their_base(tmp_path):
    base = _hf(tmp_path / "base", b"base-weights")
    best = tmp_path / "best"
    best.mkdir()
    (best / "trained.json").write_text(json.dumps({"base": str(base)}))
    (best / "trained.safetensors").write_bytes(b"trained")
    first = fingerprint(best)
    assert sorted(first["files"]) == [
        "base/config.json", "base/model.safetensors", "trained.json", "trained.safetensors"
    ]  # fmt: skip
    (base / "model.safetensors").write_bytes(b"base-weight2")  # the base changed under them
    assert fingerprint(best)["sha256"] != first["sha256"]


def test_unchanged_files_reuse_the_recorded_hash(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    path.write_bytes(b"PK\x03\x04weights")
    first = fingerprint(path)
    stat = path.stat()
    fake = {"files": {"model.npz": [stat.st_size, stat.st_mtime_ns, "recorded"]}}
    assert fingerprint(path, previous=fake)["files"]["model.npz"][2] == "recorded"  # not read again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(path, previous=fake)["files"]["model.npz"][2] == first["files"]["model.npz"][2]
    # ... and within one process a file is hashed once (a multi-GB load is not read twice),
    # also when its hash came from a recorded fingerprint (a calibration checked at load time
    # spares predict's manifest the reading).
    reads = []
    monkeypatch.setattr(fingerprint_module, "_sha256", lambda file: reads.append(file) or "x")
    fingerprint(path)
    other = tmp_path / "other.npz"
    other.write_bytes(b"PK\x03\x04other")
    stat = other.stat()
    recorded = {"files": {"other.npz": [stat.st_size, stat.st_mtime_ns, "from-calibration"]}}
    fingerprint(other, previous=recorded)
    assert fingerprint(other)["files"]["other.npz"][2] == "from-calibration"
    assert reads == []
