"""The seed's path through the CLI with the real tokenizer's size and layout (257,152 pieces).

Tiny widths, real vocabulary, real head layout (1 KV head for PaliGemma 1, KV heads < heads
for PaliGemma 2), stored in 16-bit as the published checkpoints are: ``train`` (2 steps)
→ ``evaluate`` → ``predict`` → ``convert`` back to ``.npz``, as a user runs them. The tiny
1,792-piece tokenizer never reached transformers' code path for vocabularies over 100,000
pieces, so every earlier test passed while the real file failed at the first command.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray.cli import main
from paligemma_xray.model.tiny import REAL_VOCAB_SIZE, write_tiny_npz


def _arrays(path):
    """key → (shape, dtype) as numpy itself reads the file (bfloat16 is stored as ``|V2``)."""
    with np.load(path) as arrays:
        return {key: (arrays[key].shape, arrays[key].dtype.str) for key in arrays.files}


@pytest.mark.parametrize(("version", "dtype"), [(1, "float16"), (2, "bfloat16")])
def test_train_evaluate_predict_convert_at_the_real_vocabulary(
    version, dtype, synthetic_dataset, tmp_path, capsys
):
    npz, spm = write_tiny_npz(
        tmp_path / "base" / f"pg{version}.npz", version=version, dtype=dtype, vocab_size=REAL_VOCAB_SIZE
    )
    run = tmp_path / "run"
    common = ["--batch-size", "1", "--max-new-tokens", "6"]
    assert main([
        "train", "--model", str(npz), "--tokenizer", str(spm), "--data", str(synthetic_dataset),
        "--out", str(run), "--examples", "2", "--batch-size", "1", "--eval-every", "2",
        "--eval-max-new-tokens", "4", "--no-progress",
    ]) == 0  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]
    # The run folder in proportion to what was trained: frozen weights once, in the base's
    # dtype (last/), trained ones float32; best/ holds only the trained ones.
    # (At tiny widths the tokenizer files weigh as much as the weights: counted on both sides.)
    size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    assert size <= 1.5 * (npz.stat().st_size + spm.stat().st_size)
    assert not list((run / "best").glob("model*.safetensors"))
    with safe_open(str(run / "last" / "model.safetensors"), framework="pt") as weights:
        dtypes = {k: weights.get_slice(k).get_dtype() for k in weights.keys()}  # noqa: SIM118
    attention = {k for k in dtypes if ".self_attn." in k and "vision" not in k}
    assert attention and {dtypes[k] for k in attention} == {"F32"}
    assert {dtypes[k] for k in set(dtypes) - attention} == {"F16" if dtype == "float16" else "BF16"}
    plain = PaliGemmaForConditionalGeneration.from_pretrained(run / "last")  # plain transformers
    assert plain.dtype == torch.float32  # every stored weight exactly

    assert main(["evaluate", "--model", str(run), "--data", str(synthetic_dataset), "--split", "valid",
                 "--out", str(tmp_path / "eval"), "--bootstrap", "0", *common]) == 0  # fmt: skip
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "map50" in evaluation and "parse_failures" in evaluation

    images = sorted((synthetic_dataset / "dataset").glob("*.jpg"))[:2]
    assert main(["predict", "--model", str(run), *map(str, images), "--out", str(tmp_path / "pred"),
                 "--no-images", *common]) == 0  # fmt: skip
    assert len(list((tmp_path / "pred" / "json").rglob("*.json"))) == 2

    back = tmp_path / "back" / "model.npz"
    assert main(["convert", str(run), str(back)]) == 0  # by default in the base's dtype
    assert _arrays(back) == _arrays(npz)  # the input's keys, shapes and dtypes
    assert (back.parent / "paligemma_tokenizer.model").read_bytes() == spm.read_bytes()
    assert _arrays(back)["params/llm/embedder/input_embedding"][0][0] == REAL_VOCAB_SIZE
    capsys.readouterr()
