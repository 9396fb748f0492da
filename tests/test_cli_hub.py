"""Every verb that takes ``--model`` takes a model name: the seed's steps, offline.

A Hub cache (``HF_HOME``, ``HF_HUB_OFFLINE=1``) and a kagglehub cache (``KAGGLEHUB_CACHE``)
are laid out as the libraries write them, holding tiny PaliGemmas under the names the seed
uses; each command is the README's, with the name in place of a path. The references are
the same commands (or library calls) on the local folders the caches were made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.infer import Detector
from paligemma_xray.model import load
from paligemma_xray.model.tiny import write_hub_cache, write_kaggle_cache, write_tiny_npz

MIX = "google/paligemma-3b-mix-224"
FT = "someone/paligemma-xray-fracture"
KAGGLE = "google/paligemma/jax/paligemma-3b-pt-224"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_boxes_hf_dir):
    """MIX and FT (the tiny detector that answers boxes) in an offline Hub cache."""
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "PALIGEMMA_XRAY_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    # In-process callers other than ours (peft checks a Hub base's config) stay offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_hub_cache(home, MIX, tiny_boxes_hf_dir)
    write_hub_cache(home, FT, tiny_boxes_hf_dir)
    return home


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "bee.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_vqa_with_a_mix_checkpoint_by_id(hub_cache, tiny_boxes_hf_dir, image, tmp_path, capsys):
    """README step 1: predict --model google/paligemma-3b-mix-224 --prompt "answer en …" bee.jpg."""
    prompt = "answer en What color is the flower that bee is standing on?"
    out = tmp_path / "vqa"
    argv = ["predict", "--model", MIX, "--prompt", prompt, str(image), "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "8"]) == 0
    record = json.loads((out / "json" / "bee.jpg.json").read_text())
    detector = Detector.load(tiny_boxes_hf_dir, device="cpu", progress=False)
    expected = detector.generate([image], prompt, max_new_tokens=8)[0]
    assert record["prompt"] == prompt and "detections" not in record  # an answer, not boxes
    assert record["text"] == expected.text and record["tokens"] == expected.tokens and expected.tokens
    assert f"bee.jpg\t{expected.text.strip()}" in capsys.readouterr().out


def test_predict_evaluate_convert_serve_by_id(
    hub_cache, tiny_boxes_hf_dir, image, synthetic_dataset, tmp_path, monkeypatch
):
    # predict: the same boxes as from the local folder
    for name, model in (("by-id", FT), ("by-path", str(tiny_boxes_hf_dir))):
        argv = ["predict", "--model", model, str(image), "--out", str(tmp_path / name), "--no-images"]
        assert main(argv) == 0
    by_id, by_path = (
        json.loads((tmp_path / n / "json" / "bee.jpg.json").read_text()) for n in ("by-id", "by-path")
    )
    assert by_id["detections"] == by_path["detections"] and by_id["detections"]["detections"]

    # evaluate: the model is recorded by its name
    argv = ["evaluate", "--model", FT, "--data", str(synthetic_dataset), "--out", str(tmp_path / "eval")]
    assert main([*argv, "--bootstrap", "0", "--max-new-tokens", "12"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == FT

    # convert: the same npz as from the local folder
    assert main(["convert", FT, str(tmp_path / "by-id.npz")]) == 0
    assert main(["convert", str(tiny_boxes_hf_dir), str(tmp_path / "by-path.npz")]) == 0
    with np.load(tmp_path / "by-id.npz") as a, np.load(tmp_path / "by-path.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)

    # serve: the app is built around the named model (uvicorn not started)
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    commit = next(
        (hub_cache / "hub" / "models--someone--paligemma-xray-fracture" / "snapshots").iterdir()
    ).name
    assert main(["serve", "--model", FT, "--revision", commit, "--port", "0", "--device", "cpu"]) == 0
    with TestClient(apps[0]) as client:
        assert client.get("/v1/model").json()["model_id"] == f"{FT}@{commit}"


def test_train_by_hub_id_records_the_name(hub_cache, synthetic_dataset, tmp_path):
    """A LoRA run on a Hub base: its adapter names the base by id, so it loads anywhere the id does."""
    run = tmp_path / "run"
    argv = [
        "train",
        "--model",
        MIX,
        "--revision",
        "main",
        "--data",
        str(synthetic_dataset),
        "--out",
        str(run),
    ]
    tiny = ["--recipe", "lora", "--examples", "2", "--batch-size", "2", "--eval-max-new-tokens", "4"]
    assert main([*argv, *tiny, "--no-progress"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == MIX and config["revision"] == "main"
    adapter = json.loads((run / "last" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == MIX and adapter["revision"] == "main"
    merged, _ = load(run / "last" / "adapter", progress=False)  # base fetched by id, offline
    reference, _ = load(run / "last", progress=False)
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert all(np.allclose(ours[k].numpy(), theirs[k].numpy(), atol=1e-5) for k in theirs)


def test_train_from_the_kaggle_npz_and_write_the_finetuned_npz_back(synthetic_dataset, tmp_path, monkeypatch):
    """README steps 3 and 4: train from kaggle:…/paligemma-3b-pt-224, then the fine-tuned .npz."""
    pytest.importorskip("kagglehub", reason="kaggle: handles need the optional kagglehub package")
    cache = tmp_path / "kagglehub"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    npz, spm = write_tiny_npz(tmp_path / "k" / "paligemma-3b-pt-224.f16.npz", dtype="float16")
    write_kaggle_cache(cache, f"{KAGGLE}/1", {npz.name: npz, spm.name: spm})
    run = tmp_path / "run"
    argv = ["train", "--model", f"kaggle:{KAGGLE}/1", "--data", str(synthetic_dataset), "--out", str(run)]
    tiny = ["--examples", "2", "--batch-size", "2", "--eval-max-new-tokens", "4", "--no-progress"]
    assert main([*argv, *tiny, "--export-npz"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == f"kaggle:{KAGGLE}/1"
    assert (run / "last" / "model.npz").is_file()
    out = tmp_path / "finetuned" / "paligemma-3b-xray-224.f16.npz"
    assert main(["convert", str(run), str(out), "--dtype", "float16"]) == 0
    model, _ = load(out, progress=False)  # with paligemma_tokenizer.model written beside it
    trained, _ = load(run, progress=False)
    assert str(model.dtype) == "torch.float16"
    names = [k for k in trained.state_dict() if "self_attn.q_proj" in k]
    assert names and all(
        np.array_equal(model.state_dict()[k].numpy(), trained.state_dict()[k].half().numpy()) for k in names
    )


def test_names_that_do_not_resolve_end_in_one_line(hub_cache, image, tmp_path, capsys):
    for argv in (
        ["predict", "--model", "google/no-such-model", str(image), "--out", str(tmp_path / "p")],
        ["convert", "google/no-such-model", str(tmp_path / "x.npz")],
        ["serve", "--model", MIX, "--revision", "no-such-branch", "--port", "0"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert "HF_HUB_OFFLINE" in err


@pytest.mark.slow
def test_as_a_user_runs_it_with_the_environment_set_before_the_process(tiny_boxes_hf_dir, image, tmp_path):
    home = tmp_path / "hf-home"
    write_hub_cache(home, MIX, tiny_boxes_hf_dir)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    for name in ("HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "paligemma_xray.cli", "predict", "--prompt", "caption en", str(image)]
    done = subprocess.run(
        [*command, "--model", MIX, "--out", str(out), "--max-new-tokens", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "json" / "bee.jpg.json").read_text())["prompt"] == "caption en"
