"""data download: tested at the roboflow client boundary; the key never leaks."""

from __future__ import annotations

import shutil
import sys
import types

import pytest

from paligemma_xray.cli import main
from paligemma_xray.data import open_dataset
from paligemma_xray.data.download import download
from paligemma_xray.errors import ConfigError, DataError

KEY = "rf_SECRET_key_1234567890"


def _fake_roboflow(monkeypatch, export_root, calls, *, fail=None, top_level=False):
    """A stand-in for the ``roboflow`` package: records calls, 'downloads' a local export."""

    class Version:
        def download(self, model_format, location, overwrite=False):
            calls.append(("download", model_format, location))
            print(f"Downloading Dataset Version Zip in {location} (client chatter with key {KEY})")
            if fail:
                raise RuntimeError(f"{fail} for api_key={KEY}")
            source = export_root / "dataset"
            target = location if top_level else f"{location}/dataset"
            shutil.copytree(source, target, dirs_exist_ok=True)

    class Project:
        def version(self, number):
            calls.append(("version", number))
            return Version()

    class Workspace:
        def project(self, name):
            calls.append(("project", name))
            return Project()

    class Roboflow:
        def __init__(self, api_key):
            calls.append(("key", api_key))

        def workspace(self, name):
            calls.append(("workspace", name))
            return Workspace()

    module = types.ModuleType("roboflow")
    module.Roboflow = Roboflow
    monkeypatch.setitem(sys.modules, "roboflow", module)


def _all_text(folder):
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("top_level", [False, True])
def test_key_reaches_client_and_export_lands_in_roboflow_layout(
    synthetic_dataset, tmp_path, monkeypatch, capsys, top_level
):
    calls = []
    _fake_roboflow(monkeypatch, synthetic_dataset, calls, top_level=top_level)
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    out = tmp_path / "dl"
    code = main(
        ["data", "download", "--workspace", "ws", "--project", "bones", "--version", "3", "--out", str(out)]
    )
    assert code == 0
    assert ("key", KEY) in calls and ("workspace", "ws") in calls and ("version", 3) in calls
    assert ("download", "paligemma", str(out)) in calls
    assert open_dataset(out).layout == "roboflow" and (out / "dataset" / "_annotations.train.jsonl").is_file()
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    assert "client chatter" in captured.out  # the client's own output still shows, masked
    assert KEY not in _all_text(out)


def test_key_from_file(synthetic_dataset, tmp_path, monkeypatch):
    calls = []
    _fake_roboflow(monkeypatch, synthetic_dataset, calls)
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    download("ws", "bones", 1, out=tmp_path / "dl", api_key_file=key_file)
    assert ("key", KEY) in calls


def test_missing_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    assert main(["data", "download", "--workspace", "w", "--project", "p", "--version", "1"]) == 2
    assert "ROBOFLOW_API_KEY" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        download("w", "p", 1, out=tmp_path / "dl", api_key_file=tmp_path / "empty.txt")


def test_client_failure_message_never_shows_the_key(synthetic_dataset, tmp_path, monkeypatch, capsys):
    calls = []
    _fake_roboflow(monkeypatch, synthetic_dataset, calls, fail="401 Unauthorized")
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    with pytest.raises(DataError, match="401 Unauthorized") as info:
        download("w", "p", 1, out=tmp_path / "dl")
    assert KEY not in str(info.value)
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def test_missing_roboflow_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    monkeypatch.setitem(sys.modules, "roboflow", None)  # makes `import roboflow` fail
    with pytest.raises(ConfigError, match=r"paligemma-xray\[roboflow\]"):
        download("w", "p", 1, out=tmp_path / "dl")
