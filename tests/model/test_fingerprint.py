"""Checkpoint fingerprints: what `predict --resume` compares to refuse other weights."""

from __future__ import annotations

import os

from paligemma_xray.model.fingerprint import fingerprint


def test_fingerprint_follows_the_weights_and_skips_resumable_state(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "model.safetensors").write_bytes(b"weights-1")
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "checkpoints" / "step-5" / "optimizer.pt").write_bytes(b"state")
    first = fingerprint(run)
    assert list(first["files"]) == ["best/model.safetensors"]
    (run / "checkpoints" / "step-5" / "optimizer.pt").write_bytes(b"more state")
    assert fingerprint(run)["sha256"] == first["sha256"]
    (run / "best" / "model.safetensors").write_bytes(b"weights-2")  # same size, other weights
    assert fingerprint(run, previous=first)["sha256"] != first["sha256"]
    assert fingerprint(tmp_path / "hub-id-not-on-disk") is None


def test_unchanged_files_reuse_the_recorded_hash(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"weights")
    first = fingerprint(path)
    stat = path.stat()
    fake = {"files": {"model.npz": [stat.st_size, stat.st_mtime_ns, "recorded"]}}
    assert fingerprint(path, previous=fake)["files"]["model.npz"][2] == "recorded"  # not read again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(path, previous=fake)["files"]["model.npz"][2] == first["files"]["model.npz"][2]
