"""End-to-end runs on a tiny model: run folder, exact resume after SIGKILL, user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from paligemma_xray.cli import main
from paligemma_xray.errors import DataError
from paligemma_xray.train import from_run, resolve, run

REPO = Path(__file__).resolve().parents[2]


def _config(model: Path, data: Path, out: Path, **extra):
    values = {
        "examples": 16,
        "batch_size": 4,
        "eval_max_new_tokens": 6,
        "eval_batch_size": 8,
        "progress": False,
        **extra,
    }
    return resolve(
        extra.pop("recipe", None),
        overrides={"model": str(model), "data": str(data), "out": str(out), **values},
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    assert weights, f"no weights in {folder}"
    return weights


def test_big_vision_run_folder(tiny_hf_dir, synthetic_dataset, tmp_path) -> None:
    out = tmp_path / "run"
    config = _config(tiny_hf_dir, synthetic_dataset, out, eval_every=2, keep_last=1, export_npz=True)
    summary = run(config)
    assert summary.steps == 4 and summary.final_loss is not None and summary.final_loss > 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recipe"] == "big-vision" and saved["trainable"] == "attention" and saved["lr"] == 0.01
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [x["step"] for x in evals] == [2, 4]
    assert all(x["val_loss"] > 0 and 0 <= x["parse_rate"] <= 1 for x in evals)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]  # keep_last=1
    assert list((out / "tb").iterdir())
    assert (out / "last" / "model.npz").is_file() and (out / "best" / "trained.json").is_file()
    # best/ holds only what training changed (the attention projections), never the frozen weights.
    assert not list((out / "best").glob("model*.safetensors"))
    # Only the attention projections moved; every other weight is the base's, bit for bit.
    before, after = _weights(tiny_hf_dir), _weights(out / "last")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k and "vision" not in k for k in changed)

    from paligemma_xray.model import load

    model, _ = load(out)  # a run folder loads (best/)
    assert model.config.text_config.num_hidden_layers > 0


@pytest.fixture(scope="module")
def lora_reference(tiny_hf_dir, synthetic_dataset, tmp_path_factory) -> Path:
    """The uninterrupted LoRA run the killed-and-resumed runs must reproduce."""
    # LoRA + AdamW + shuffled objects: optimiser state, adapter init and augmentation all
    # have to come back exactly; the vision tower is frozen, so the feature cache is in use.
    extra = {"recipe": "lora", "examples": 24, "checkpoint_every": 1, "eval_every": 3, "keep_last": 2}
    out = tmp_path_factory.mktemp("lora_reference") / "whole"
    run(_config(tiny_hf_dir, synthetic_dataset, out, **extra))
    return out


# Killed early (after step 1) and just after the first evaluation wrote best/ (step 3, of 6);
# fixed steps, so that a failure can be reproduced.
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_then_resume_ends_with_the_same_weights(
    tiny_hf_dir, synthetic_dataset, lora_reference, tmp_path, kill_after
) -> None:
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "paligemma_xray.cli",
        "train",
        "--model",
        str(tiny_hf_dir),
        "--data",
        str(synthetic_dataset),
        "--out",
        str(out),
        "--recipe",
        "lora",
        "--examples",
        "24",
        "--batch-size",
        "4",
        "--eval-max-new-tokens",
        "6",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "3",
        "--keep-last",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        # The metrics line of a step is written before its checkpoint: wait for both, since a
        # run killed before its first checkpoint has nothing to resume (a clear error, tested
        # elsewhere), which is not what this test is about.
        if (
            metrics.exists()
            and any(json.loads(x)["step"] >= kill_after for x in metrics.read_text().splitlines())
            and any((out / "checkpoints").glob("step-*/state.json"))
        ):
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "last").exists()

    resumed = run(from_run(out), resume=True)
    assert (out / "last" / "adapter" / "adapter_config.json").is_file()
    assert resumed.steps == json.loads((lora_reference / "summary.json").read_text())["steps"]
    expected, got = _weights(lora_reference / "last"), _weights(out / "last")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    # The resumed log is the uninterrupted one: no step twice, losses identical.
    def train_losses(folder):
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert train_losses(out) == train_losses(lora_reference)


def test_resume_and_fresh_run_guards(tiny_hf_dir, synthetic_dataset, tmp_path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_hf_dir)]) == 2
    assert "--data" in capsys.readouterr().err


def _jsonl_set(root: Path, splits: dict[str, list[dict]]) -> Path:
    folder = root / "dataset"
    folder.mkdir(parents=True)
    for split, rows in splits.items():
        (folder / f"_annotations.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_data_mistakes_are_clear_errors(tiny_hf_dir, synthetic_dataset, tmp_path, capsys) -> None:
    image = next((synthetic_dataset / "dataset").glob("*.jpg")).name
    (tmp_path / "a" / "dataset").mkdir(parents=True)
    no_train = _jsonl_set(
        tmp_path / "b", {"valid": [{"image": image, "prefix": "detect fracture", "suffix": ""}]}
    )
    with pytest.raises(DataError, match="train"):
        run(_config(tiny_hf_dir, no_train, tmp_path / "r1"))
    code = main(
        ["train", "--model", str(tiny_hf_dir), "--data", str(no_train), "--out", str(tmp_path / "r2")]
    )
    assert code == 2 and "error:" in capsys.readouterr().err


def test_a_model_that_does_not_load_leaves_no_run_folder(tiny_hf_dir, synthetic_dataset, tmp_path, capsys):
    import shutil

    from paligemma_xray.errors import PaligemmaXrayError

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_hf_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(PaligemmaXrayError, match="no-weights"):
        run(_config(broken, synthetic_dataset, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # used to keep a config.yaml-only run folder
    (tmp_path / "taken").write_text("")
    argv = ["--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--out", str(tmp_path / "taken")]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "taken: exists and is not a folder" in err and "Traceback" not in err


def test_early_stop_keeps_best_and_progress_page_shows_each_validation(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    # lr 0: the loss never improves after the first evaluation, so the run stops at the third.
    argv = ["train", "--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--out", str(out),
            "--examples", "32", "--batch-size", "4", "--lr", "0", "--eval-every", "1", "--early-stop", "2",
            "--eval-max-new-tokens", "6", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "trained 3 steps (early stop)" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [1, 2, 3]
    assert [r["step"] for r in log if r["kind"] == "early_stop"] == [3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["stopped_early"] is True
    # best/ holds only what training changed (trained.json + weights); last/ is a full HF folder
    assert (out / "best" / "trained.json").is_file() and (out / "last" / "config.json").is_file()
    page = (out / "progress.html").read_text()
    n_valid = len((Path(synthetic_dataset) / "dataset" / "_annotations.valid.jsonl").read_text().splitlines())
    assert "step 3" in page and page.count("data:image/jpeg") == min(8, n_valid)
    assert page.count("<svg") == 2  # the loss and the mAP curves


def test_train_skips_unreadable_images_up_to_max_bad_records_and_refuses_outside_images(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys
) -> None:
    import shutil

    from paligemma_xray.data import open_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    records = open_dataset(data).records("train")
    first = records[0]
    first.image.write_bytes(b"not a jpeg")  # an image that data check would report
    # one pass over every training record, so the unreadable one is met
    argv = ["train", "--model", str(tiny_hf_dir), "--data", str(data), "--examples", str(len(records)),
            "--batch-size", "1", "--eval-every", "1000", "--eval-max-new-tokens", "4",
            "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "tolerant")]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "strict"), "--max-bad-records", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{first.source}:{first.line}:" in err and "Traceback" not in err

    # a record whose image lies outside the data set: refused (file:line), unless allowed
    annotations = first.source
    lines = annotations.read_text().splitlines()
    record = json.loads(lines[1])
    outside = tmp_path / "elsewhere.jpg"
    shutil.copyfile(data / "dataset" / record["image"], outside)
    record["image"] = os.path.relpath(outside, annotations.parent)
    annotations.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    ds = open_dataset(data)
    assert [p.line for p in ds.problems if p.kind == "outside_image"] == [2]
    assert main([*argv, "--out", str(tmp_path / "outside"), "--allow-outside-images"]) == 0
    config = yaml.safe_load((tmp_path / "outside" / "config.yaml").read_text())
    assert config["allow_outside_images"] is True and config["max_bad_records"] == 10


def test_training_progress_off_a_terminal_is_a_few_plain_lines(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys
):
    """A log file gets periodic lines, not one per step (the demo's log once had thousands)."""
    argv = ["train", "--model", str(tiny_hf_dir), "--data", str(synthetic_dataset),
            "--out", str(tmp_path / "r"), "--examples", "12", "--batch-size", "1",
            "--eval-every", "1000", "--eval-max-new-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train:")]
    assert 1 <= len(lines) <= 3, lines  # opening, (maybe one periodic), closing — of 12 steps
