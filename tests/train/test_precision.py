"""``precision: bf16`` on the CPU: the GPU's precision path (frozen weights in bf16, trained
ones in float32, bf16 autocast) runs here, so that a dtype mistake in it shows without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interrupted import interrupted_copy  # tests/train is on the path
from safetensors.torch import load_file

from paligemma_xray.train import from_run, resolve, run


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "examples_per_s")} for r in rows]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _rows(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("recipe", ["big-vision", "lora", "qlora"])
def test_bf16_training_on_cpu(recipe, tiny_hf_dir, synthetic_dataset, tmp_path) -> None:
    if recipe == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes cannot be imported (pip install '.[gpu]')")

    def train(out: Path, precision: str) -> Path:
        values = {"model": str(tiny_hf_dir), "data": str(synthetic_dataset), "out": str(out)}
        values |= {"examples": 16, "batch_size": 4, "eval_every": 4, "eval_max_new_tokens": 4}
        values |= {"checkpoint_every": 1, "keep_last": 4, "progress": False, "device": "cpu"}
        run(resolve(recipe, overrides={**values, "precision": precision}))
        return out

    bf16, float32 = train(tmp_path / "bf16", "bf16"), train(tmp_path / "float32", "float32")
    # bf16 arithmetic ran (losses differ from float32's) and trains the same (they stay close).
    assert _losses(bf16) != _losses(float32)
    assert _losses(bf16) == pytest.approx(_losses(float32), rel=1e-2)
    # Trained weights are kept and saved in float32, in the checkpoints and in last/; last/
    # holds the base's frozen weights bit for bit, not their bf16 training copies.
    trained = load_file(bf16 / "checkpoints" / "step-4" / "trainable.safetensors")
    assert trained and {t.dtype for t in trained.values()} == {torch.float32}
    base, last = _tensors(tiny_hf_dir), _tensors(bf16 / "last")
    changed = {k for k in base if not torch.equal(base[k], last[k])}
    assert changed and all("language_model" in k and last[k].dtype == torch.float32 for k in changed)
    # A resume in bf16 continues exactly.
    resumed = interrupted_copy(bf16, tmp_path / "resumed", step=2)
    run(from_run(resumed), resume=True)
    assert _rows(resumed) == _rows(bf16)
    expected, got = _tensors(bf16 / "last"), _tensors(resumed / "last")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
