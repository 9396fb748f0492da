"""Two processes (gloo, CPU, launched by torchrun) = one process with the same global batch;
FSDP in bf16 over two processes resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interrupted import interrupted_copy  # tests/train is on the path
from safetensors.torch import load_file

from paligemma_xray.train import resolve, run

REPO = Path(__file__).resolve().parents[2]
FLAGS = {"examples": 16, "batch_size": 4, "eval_every": 2, "eval_max_new_tokens": 4, "progress": False}


def _losses(run_dir: Path, kind: str, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == kind]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in (run_dir / "last").glob("*.safetensors") for k, v in load_file(f).items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(model: Path, data: Path, out: Path, **extra) -> Path:
    run(resolve(overrides={"model": str(model), "data": str(data), "out": str(out), **FLAGS, **extra}))
    return out


def test_two_processes_match_one(tiny_hf_dir, synthetic_dataset, tmp_path) -> None:
    one = _single(tiny_hf_dir, synthetic_dataset, tmp_path / "one")
    two = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "paligemma_xray.cli",
        "train",
        "--model",
        str(tiny_hf_dir),
        "--data",
        str(synthetic_dataset),
        "--out",
        str(two),
        "--examples",
        "16",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--eval-max-new-tokens",
        "4",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    assert len(_losses(two, "train", "loss")) == 4
    assert _losses(two, "train", "loss") == pytest.approx(_losses(one, "train", "loss"), rel=1e-5)
    # Validation is shared out over the two processes and gathered: same figures.
    assert _losses(two, "eval", "val_loss") == pytest.approx(_losses(one, "eval", "val_loss"), rel=1e-5)
    assert _losses(two, "eval", "parse_rate") == _losses(one, "eval", "parse_rate")
    w1, w2 = _weights(one), _weights(two)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("loss", ["example", "token"])
def test_gradient_accumulation_matches_the_full_batch(tiny_hf_dir, synthetic_dataset, tmp_path, loss) -> None:
    extra = {"eval_every": 100, "eval_decode": False, "loss": loss, "examples": 8}
    full = _single(tiny_hf_dir, synthetic_dataset, tmp_path / "full", **extra)
    accum = _single(tiny_hf_dir, synthetic_dataset, tmp_path / "accum", grad_accum=4, **extra)
    assert _losses(accum, "train", "loss") == pytest.approx(_losses(full, "train", "loss"), rel=1e-5)
    w1, w2 = _weights(full), _weights(accum)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=key)


def _launch(args: list[str], processes: int) -> None:
    """``paligemma-xray train ARGS`` in fresh processes, one intra-op thread each (every
    process of every run alike: thread counts change float sums)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "paligemma_xray.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "examples_per_s")} for r in rows]


@pytest.mark.parametrize("recipe", ["big-vision", "lora"])
def test_fsdp_in_bf16_over_two_processes_resumes_exactly(
    recipe, tiny_hf_dir, synthetic_dataset, tmp_path
) -> None:
    # bf16: frozen weights bf16 and trained ones float32 in the same decoder layers, which
    # FSDP1 could not flatten into one parameter. Evaluation at the last step only, so that
    # the copy interrupted after step 2 holds no best/ yet.
    flags = ["--recipe", recipe, "--distributed", "fsdp", "--precision", "bf16", "--device", "cpu"]
    flags += ["--model", str(tiny_hf_dir), "--data", str(synthetic_dataset), "--examples", "16"]
    flags += ["--batch-size", "4", "--eval-every", "4", "--eval-max-new-tokens", "4"]
    flags += ["--checkpoint-every", "1", "--keep-last", "4", "--no-progress"]
    whole, one = tmp_path / "whole", tmp_path / "one"
    _launch([*flags, "--out", str(whole)], processes=2)
    _launch([*flags, "--out", str(one)], processes=1)
    resumed = interrupted_copy(whole, tmp_path / "resumed", step=2)
    _launch(["--resume", str(resumed)], processes=2)

    assert json.loads((resumed / "summary.json").read_text())["processes"] == 2
    assert _rows(resumed) == _rows(whole)  # losses, validation figures: identical
    folders = ["last", "best"] + (["last/adapter"] if recipe == "lora" else [])
    for folder in folders:
        expected, got = _tensors(whole / folder), _tensors(resumed / folder)
        assert expected and expected.keys() == got.keys(), folder
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{folder}: {key}"
    # Sharded, the same training as on one process (bf16 sums in another order: close).
    assert _losses(whole, "train", "loss") == pytest.approx(_losses(one, "train", "loss"), rel=1e-4)
    # last/ holds the base's frozen weights bit for bit (not their bf16 training copies).
    base, last = _tensors(tiny_hf_dir), _tensors(whole / "last")
    changed = {k for k in base if not torch.equal(base[k], last[k])}
    assert changed and all("language_model" in k and last[k].dtype == torch.float32 for k in changed)


def test_fsdp_refuses_4bit_weights_in_one_line() -> None:
    from paligemma_xray.errors import ConfigError
    from paligemma_xray.train.loop import _check_world
    from paligemma_xray.train.recipes import preset

    config = preset("qlora")
    config.distributed = "fsdp"
    _check_world(config, 1)  # one process shards nothing
    with pytest.raises(ConfigError, match="fsdp cannot shard 4-bit weights"):
        _check_world(config, 2)
    config.distributed = "ddp"
    _check_world(config, 2)
