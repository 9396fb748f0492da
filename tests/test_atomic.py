"""Outputs appear complete under their final name or not at all."""

from __future__ import annotations

import errno

import pytest

from paligemma_xray import atomic


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = atomic.write_text(tmp_path / "report.html", "old")
    with pytest.raises(RuntimeError), atomic.open_for_write(target) as file:
        file.write("half of the new one")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_full_disk_is_one_error_naming_the_path(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(atomic.OutputError) as caught:
        atomic.write_bytes(tmp_path / "x.png", b"123")
    assert str(caught.value) == f"{tmp_path / 'x.png'}: cannot write: no space left on the device"
    assert list(tmp_path.iterdir()) == []


def test_a_staged_folder_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.bin").write_text("from the previous run")
    with atomic.staged_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights.bin").write_text("complete")
    with pytest.raises(ValueError), atomic.staged_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise ValueError("weights failed")
    assert (final / "weights.bin").read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_leftovers_of_killed_writes_are_found_and_removed(tmp_path):
    (tmp_path / ".a.json.tmp-1-abc").write_text("x")
    (tmp_path / ".b.tmp-2-def").mkdir()
    (tmp_path / "kept.json").write_text("{}")
    assert atomic.remove_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]


def test_check_fresh_refuses_a_non_empty_target_unless_overwriting(tmp_path):
    from paligemma_xray.errors import ConfigError

    (tmp_path / "empty").mkdir()
    assert atomic.check_fresh(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    assert atomic.check_fresh(tmp_path / "absent", overwrite=False) == tmp_path / "absent"
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.jpg").write_bytes(b"")
    (tmp_path / "model.npz").write_bytes(b"")
    for taken in (tmp_path / "set", tmp_path / "model.npz"):
        with pytest.raises(ConfigError, match="--overwrite"):
            atomic.check_fresh(taken, overwrite=False, what="data set")
        assert atomic.check_fresh(taken, overwrite=True) == taken
