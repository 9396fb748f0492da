"""End-to-end runs on a tiny model: run folder, exact resume after SIGKILL, user errors."""

from __future__ import annotations

import json
import logging
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


def _same_threads_env() -> dict[str, str]:
    """The environment of a training subprocess that computes exactly as this process does.

    Float sums depend on the number of CPU threads: the subprocess gets this process's
    count, whatever OMP_NUM_THREADS the suite was started with (forcing 1 there, while the
    in-process reference followed the environment, made `OMP_NUM_THREADS=2 pytest` fail).
    """
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO / "src")}


def _lora_command(out: Path, tiny_hf_dir: Path, synthetic_dataset: Path, *extra: str) -> list[str]:
    """The CLI form of ``lora_reference``'s run (checkpoints do not change the weights)."""
    return [
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
        *extra,
    ]


def _assert_same_run(got: Path, expected: Path) -> None:
    """``got`` ended with ``expected``'s weights, bit for bit, and the same training log."""
    assert (got / "last" / "adapter" / "adapter_config.json").is_file()
    a, b = _weights(expected / "last"), _weights(got / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # The resumed log is the uninterrupted one: no step twice, losses identical.
    def train_losses(folder):
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert train_losses(got) == train_losses(expected)


# Killed early (after step 1) and just after the first evaluation wrote best/ (step 3, of 6);
# fixed steps, so that a failure can be reproduced.
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_then_resume_ends_with_the_same_weights(
    tiny_hf_dir, synthetic_dataset, lora_reference, tmp_path, kill_after
) -> None:
    out = tmp_path / "killed"
    command = _lora_command(out, tiny_hf_dir, synthetic_dataset)
    process = subprocess.Popen(
        command, env=_same_threads_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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
    assert resumed.steps == json.loads((lora_reference / "summary.json").read_text())["steps"]
    _assert_same_run(out, lora_reference)


def test_sigterm_saves_a_checkpoint_and_says_how_to_continue(
    tiny_hf_dir, synthetic_dataset, lora_reference, tmp_path
) -> None:
    """What `kill`, systemd, Slurm and Kubernetes send is handled as Ctrl-C: the step in
    progress ends, a checkpoint is saved (none was due: --checkpoint-every 100), the run
    stops with a line saying how to continue, and the continuation is exact."""
    out = tmp_path / "terminated"
    command = _lora_command(out, tiny_hf_dir, synthetic_dataset, "--checkpoint-every", "100")
    process = subprocess.Popen(
        command, env=_same_threads_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    message = err.decode()
    assert process.returncode == 143, message[-2000:]
    assert f"Continue with: paligemma-xray train --resume {out}" in message and "Traceback" not in message
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-") and saved[0] != "step-6"
    run(from_run(out), resume=True)
    _assert_same_run(out, lora_reference)


def test_resume_writes_into_the_folder_given_even_when_copied_or_moved(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys
) -> None:
    import shutil

    original = tmp_path / "runA"
    run(_config(tiny_hf_dir, synthetic_dataset, original, examples=8, checkpoint_every=1, eval_every=100))
    before = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    # A copy that lost its last step: resuming it trains step 2 into the copy, not into runA.
    copy = tmp_path / "runB"
    shutil.copytree(original, copy)
    for name in ("last", "best", "checkpoints/step-2"):
        shutil.rmtree(copy / name, ignore_errors=True)
    (copy / "summary.json").unlink()
    assert main(["train", "--resume", str(copy)]) == 0
    assert f"trained 2 steps into {copy}" in capsys.readouterr().out
    assert (copy / "last" / "config.json").is_file() and (copy / "checkpoints" / "step-2").is_dir()
    after = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    assert after == before  # the original run is untouched
    a, b = _weights(original / "last"), _weights(copy / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A moved run resumes where it now is.
    moved = tmp_path / "elsewhere" / "runC"
    moved.parent.mkdir()
    shutil.move(str(original), moved)
    assert main(["train", "--resume", str(moved)]) == 0
    assert str(moved) in capsys.readouterr().out


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0_or_is_overwritten(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys, caplog
) -> None:
    reference = tmp_path / "reference"
    run(_config(tiny_hf_dir, synthetic_dataset, reference, examples=8, eval_every=100))
    # What a kill during the first checkpoint leaves: config.yaml, the first metrics lines,
    # and the checkpoint's staging folder (never renamed to step-N).
    killed = tmp_path / "killed"
    (killed / "checkpoints" / ".step-2.tmp-1-abcdef12").mkdir(parents=True)
    (killed / "config.yaml").write_text((reference / "config.yaml").read_text())
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:1]) + lines[1][:20])  # and half a line
    argv = ["--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--out", str(killed),
            "--examples", "8", "--batch-size", "4", "--eval-every", "100", "--eval-max-new-tokens", "6",
            "--eval-batch-size", "8", "--no-progress"]  # fmt: skip
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(killed)]) == 0
    assert "no checkpoint saved yet; training again from step 0" in caplog.text
    assert not list((killed / "checkpoints").glob(".*"))

    def rows(folder: Path) -> list[tuple]:
        log = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r["step"], r.get("loss")) for r in log]

    assert rows(killed) == rows(reference)  # no line twice, none half
    a, b = _weights(reference / "last"), _weights(killed / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --overwrite replaces a run; without it the run is refused (above).
    assert main(["train", *argv, "--overwrite"]) == 0
    assert rows(killed) == rows(reference)


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


def test_a_resume_under_another_thread_count_says_results_will_differ(
    tiny_hf_dir, synthetic_dataset, tmp_path, caplog
) -> None:
    out = tmp_path / "run"
    run(_config(tiny_hf_dir, synthetic_dataset, out, examples=8, eval_every=100))
    state = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())
    threads = torch.get_num_threads()
    assert state["runtime"]["threads"] == threads and state["runtime"]["torch"] == torch.__version__
    with caplog.at_level(logging.WARNING):
        run(from_run(out), resume=True)
    assert "last bits" not in caplog.text  # the same threads: an exact resume claims nothing
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING):
            run(from_run(out), resume=True)
    finally:
        torch.set_num_threads(threads)  # the next test in this process computes as before
    lines = [r.getMessage() for r in caplog.records if "last bits" in r.getMessage()]
    assert len(lines) == 1 and f"threads {threads + 1} (the run started with {threads})" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["checkpoint-writing:2", "pruning:4"])
def test_killed_mid_checkpoint_or_mid_pruning_resumes_to_the_same_run(
    tiny_hf_dir, synthetic_dataset, lora_reference, tmp_path, kill_at
) -> None:
    """A few kills of ``benchmarks/kill_storm.py`` (it runs many): SIGKILL while a checkpoint
    is half written, and while an old one is being pruned; the resumed run is the
    uninterrupted one tensor by tensor (weights, adapter, optimiser state, RNG) and line by
    line (``metrics.jsonl``: no step lost, none twice)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import kill_storm

    out = tmp_path / "killed"
    command = kill_storm.train_command("lora", tiny_hf_dir, synthetic_dataset, out, steps=6)
    env = {**_same_threads_env(), "PALIGEMMA_XRAY_KILL_AT": kill_at}
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert list((out / "checkpoints").glob(".step-*.tmp-*"))  # the kill left a temporary behind
    run(from_run(out), resume=True)
    result = kill_storm.compare(lora_reference, out)
    assert result["identical"], result["differences"]
    assert result["lost_steps"] == [] and result["duplicated_lines"] == 0
