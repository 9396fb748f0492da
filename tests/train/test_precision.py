"""precision: bf16 on a CPU: allowed where the CPU multiplies bfloat16 natively, refused elsewhere."""

from __future__ import annotations

import json
import math

import pytest

from paligemma_xray.errors import ConfigError
from paligemma_xray.model import dtypes
from paligemma_xray.train import resolve, run


def _config(model, data, out):
    overrides = {"model": str(model), "data": str(data), "out": str(out), "examples": 8, "batch_size": 4,
                 "eval_every": 0, "precision": "bf16", "progress": False, "device": "cpu"}  # fmt: skip
    return resolve(None, overrides=overrides)


def test_bf16_training_on_a_cpu_with_native_bf16(tiny_hf_dir, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    summary = run(_config(tiny_hf_dir, synthetic_dataset, tmp_path / "run"))
    assert summary.steps == 2 and math.isfinite(summary.final_loss) and summary.final_loss > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in lines if x["kind"] == "train")


def test_bf16_training_refused_on_a_cpu_without_it(tiny_hf_dir, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="native bfloat16 matmul"):
        run(_config(tiny_hf_dir, synthetic_dataset, tmp_path / "run"))
