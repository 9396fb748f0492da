"""A calibration is applied to the weights it was fitted on, and to no others, in every checkpoint form.

`evaluate --operating-point` on a run folder used to fit on best/'s weights (what `model.load`
picks) and save beside last/'s; `predict --model RUN/last` then applied it to other weights
and `predict --model RUN/best` found none.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from paligemma_xray.cli import main
from paligemma_xray.infer import Detector
from paligemma_xray.infer.calibrated import Calibration, calibration_path, find_calibration
from paligemma_xray.model import convert, load, save_lora
from paligemma_xray.model.forms import identify

EVAL = ["--bootstrap", "0", "--batch-size", "4", "--max-new-tokens", "24", "--split", "test"]


def _evaluate(model: Path, data: Path, out: Path, point: str = "f1") -> Calibration:
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), *EVAL]
    assert main([*argv, "--operating-point", point]) == 0
    return Calibration.load(out / "calibration.json")


def _predict(model: Path, images: Path, out: Path) -> set[float | None]:
    """The operating thresholds `predict` applied (None: no calibration applied)."""
    argv = ["predict", "--model", str(model), str(images), "--out", str(out), "--no-images"]
    assert main([*argv, "--max-new-tokens", "24"]) == 0
    found = [json.loads(p.read_text())["detections"] for p in (out / "json").rglob("*.json")]
    assert found
    return {record.get("operating_threshold") for record in found}


@pytest.fixture(scope="module")
def images(synthetic_dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(Path(synthetic_dataset).rglob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _trained_over_base(base: Path, folder: Path) -> Path:
    """A run's best/ form: trained.json naming ``base`` + one trained weight, nudged."""
    from safetensors.torch import save_file

    model, _ = load(base, progress=False)
    name = "model.language_model.layers.0.self_attn.o_proj.weight"
    weight = dict(model.named_parameters())[name].detach().clone()
    folder.mkdir(parents=True)
    save_file({name: weight * 1.001}, folder / "trained.safetensors")
    (folder / "trained.json").write_text(json.dumps({"base": str(base)}))
    return folder


def _adapter(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = load(base, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
    return save_lora(peft_model, folder, base=base)


def _run(base: Path, folder: Path) -> Path:
    """A run folder: best/ (trained weights over ``base``) beside last/ (a full HF folder)."""
    _trained_over_base(base, folder / "best")
    shutil.copytree(base, folder / "last")
    return folder


FORMS = ["npz", "hf", "adapter", "trained", "run"]


@pytest.mark.parametrize("form", FORMS)
def test_the_calibration_evaluate_fits_is_the_one_load_applies_to_those_weights(
    form, tiny_boxes_hf_dir, synthetic_dataset, tmp_path, caplog
):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_boxes_hf_dir, hf)
    model = {
        "npz": lambda: convert(hf, tmp_path / "m.npz", progress=False),
        "hf": lambda: hf,
        "adapter": lambda: _adapter(hf, tmp_path / "adapter"),
        "trained": lambda: _trained_over_base(hf, tmp_path / "best"),
        "run": lambda: _run(hf, tmp_path / "run"),
    }[form]()
    assert identify(model).form == form
    fitted = _evaluate(model, synthetic_dataset, tmp_path / "eval")
    assert fitted.threshold is not None
    saved = identify(model).calibration
    assert saved.is_file() and Calibration.load(saved) == fitted and fitted.weights is not None
    assert Detector.load(model, device="cpu", progress=False).calibration == fitted
    # The weights it was fitted on change: it is no longer theirs.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        weights = identify(model)
        victim = sorted(p for p in weights.weight_files().values() if p.suffix in (".npz", ".safetensors"))[0]
        victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
        assert find_calibration(model) is None
    assert "fitted on other weights" in caplog.text and str(saved) in caplog.text


def test_a_run_s_best_and_last_each_get_only_their_own_calibration(
    tiny_boxes_hf_dir, synthetic_dataset, images, tmp_path, caplog
):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_boxes_hf_dir), "--data", str(synthetic_dataset), "--out", str(run),
            "--examples", "8", "--batch-size", "4", "--lr", "1e-4", "--eval-every", "1",
            "--eval-max-new-tokens", "6", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    best, last = run / "best", run / "last"
    assert (best / "trained.json").is_file() and (last / "config.json").is_file()

    on_best = _evaluate(run, synthetic_dataset, tmp_path / "eval-run")
    assert (
        calibration_path(run) == best / "calibration.json"
        and Calibration.load(best / "calibration.json") == on_best
    )
    assert not (last / "calibration.json").exists()  # used to be saved here
    assert _predict(run, images, tmp_path / "p-run") == {on_best.threshold}
    assert _predict(best, images, tmp_path / "p-best") == {on_best.threshold}
    assert _predict(last, images, tmp_path / "p-last") == {None}  # none fitted on last/ yet

    on_last = _evaluate(last, synthetic_dataset, tmp_path / "eval-last", point="sensitivity=0.5")
    assert Detector.load(last, device="cpu", progress=False).calibration == on_last
    assert Detector.load(run, device="cpu", progress=False).calibration == on_best
    assert on_last.weights["sha256"] != on_best.weights["sha256"]

    # best/'s calibration copied beside last/'s weights is not applied, and says why.
    shutil.copyfile(best / "calibration.json", last / "calibration.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _predict(last, images, tmp_path / "p-copied") == {None}
    warnings = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(warnings) == 1 and "fitted on other weights" in warnings[0] and "\n" not in warnings[0]


def test_a_calibration_that_records_no_weights_is_not_applied(tiny_boxes_hf_dir, tmp_path, caplog):
    model = tmp_path / "hf"
    shutil.copytree(tiny_boxes_hf_dir, model)
    old = Calibration(None, None, 0.25, "f1", 0.5, "platt").to_json()
    old.pop("weights")
    old["format"] = 1  # as written before the weights were recorded
    (model / "calibration.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        assert find_calibration(model) is None
    assert "does not record which weights" in caplog.text
