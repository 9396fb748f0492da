"""The one answer to "which checkpoint form is this path": what load, calibration and fingerprint use."""

from __future__ import annotations

import json

import pytest

from paligemma_xray.errors import CheckpointError
from paligemma_xray.model.forms import calibration_file, check_checkpoint, identify


def _hf(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_each_form_and_where_its_calibration_lives(tmp_path):
    npz = tmp_path / "m.npz"
    npz.write_bytes(b"PK\x03\x04")
    (tmp_path / "paligemma_tokenizer.model").write_bytes(b"spm")
    form = identify(npz)
    assert (form.form, form.weights, form.tokenizer) == ("npz", npz, tmp_path / "paligemma_tokenizer.model")
    assert form.calibration == tmp_path / "m.calibration.json"

    hf = _hf(tmp_path / "hf")
    assert (identify(hf).form, identify(hf).calibration) == ("hf", hf / "calibration.json")

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../hf"}))
    form = identify(adapter)
    assert (form.form, form.base, form.calibration) == (
        "adapter",
        adapter / "../hf",
        adapter / "calibration.json",
    )

    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / "trained.json").write_text(json.dumps({"base": str(hf), "tokenizer": "/t/tokenizer.model"}))
    form = identify(best)
    assert (form.form, form.base, str(form.tokenizer)) == ("trained", hf, "/t/tokenizer.model")


def test_a_run_folder_is_its_best_else_its_last_and_so_is_its_calibration(tmp_path):
    run = tmp_path / "run"
    _hf(run / "last")
    form = identify(run)
    assert (form.form, form.weights_form, form.weights, form.calibration) == (
        "run", "hf", run / "last", run / "last" / "calibration.json"
    )  # fmt: skip
    best = run / "best"
    best.mkdir()
    (best / "trained.json").write_text(json.dumps({"base": str(run / "last")}))
    form = identify(run)
    # best/ holds trained.json, not config.json: it still wins, and the calibration goes with it
    # (it used to go to last/, beside weights it was not fitted on).
    assert (form.form, form.weights_form, form.calibration) == ("run", "trained", best / "calibration.json")
    assert identify(run / "last").calibration == run / "last" / "calibration.json"


def test_wrong_paths_say_what_they_are(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        identify(tmp_path / "nothing")
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CheckpointError, match="a PNG image, not a checkpoint"):
        check_checkpoint(image)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        identify(tmp_path)
    best = tmp_path / "best"
    best.mkdir()
    (best / "trained.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match="gone"):  # before minutes of loading
        check_checkpoint(best)
    assert calibration_file(tmp_path / "runs" / "m.npz") == tmp_path / "runs" / "m.calibration.json"
