"""The error types and the output-path check every writer calls before doing any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paligemma_xray.errors import ConfigError, PaligemmaXrayError, check_output


def test_message_names_path_and_line() -> None:
    error = PaligemmaXrayError("bad", path="a.jsonl", line=3)
    assert str(error) == "a.jsonl:3: bad" and error.exit_code == 2


def test_check_output_accepts_new_and_existing_paths(tmp_path) -> None:
    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert check_output(tmp_path, folder=True) == tmp_path
    assert check_output(tmp_path / "x" / "report.html", folder=False).name == "report.html"
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()  # creates nothing


def test_check_output_refuses_the_wrong_kind(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_output(a_file, folder=True)
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(tmp_path, folder=False)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output(a_file / "sub" / "out.npz", folder=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_refuses_an_unwritable_parent(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_output(locked / "run", folder=True)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_check_output_refuses_a_folder_that_takes_no_new_files() -> None:
    # /proc looks writable to root (permission bits) but mkdir there fails: one line, not a
    # FileNotFoundError traceback after the model has loaded (`train --out /proc/x`).
    with pytest.raises(ConfigError, match="/proc"):
        check_output("/proc/x", folder=True)
