"""QLoRA (4-bit NF4 base, bitsandbytes) on the CPU: it trains, its gradients stay right after a
validation, and the adapter it saves loads over the base and predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_xray.cli import main
from paligemma_xray.model import build_batch, load
from paligemma_xray.model.tiny import REAL_VOCAB_SIZE, tiny_model, write_tiny_hf
from paligemma_xray.train import preset
from paligemma_xray.train.strategies import prepare_model, unwrap

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes cannot be imported (pip install '.[gpu]')")

CPU = torch.device("cpu")


def _batch(processor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(2)]
    return build_batch(processor, images, ["detect fracture"] * 2, ["<loc0100><loc0200> fracture", "none"])


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_base_is_4bit_and_its_gradients_survive_a_validation() -> None:
    model, processor = tiny_model(version=1)
    model = prepare_model(model, preset("qlora"), CPU, bf16=False)
    linears = [m for m in unwrap(model).model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.dtype == torch.uint8 and m.weight.bnb_quantized for m in linears)
    batch = _batch(processor)
    with torch.no_grad():  # the adapters' B starts at 0: make every layer's adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before = _lora_grads(model, batch)
    assert before and all(g.abs().sum() > 0 for g in before.values())
    # What validation does between steps: eval mode, no gradients. On a CPU with AVX512-BF16,
    # bitsandbytes then repacks the weights for a kernel without a backward, and the gradient
    # into every layer below an adapted linear was silently lost from the next step on.
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    after = _lora_grads(model, batch)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


def test_qlora_without_bitsandbytes_is_one_clear_line(monkeypatch) -> None:
    from paligemma_xray.errors import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails
    model, _ = tiny_model(version=1)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install"):
        prepare_model(model, preset("qlora"), CPU, bf16=False)


@pytest.fixture(scope="module")
def real_vocab_hf_dir(tmp_path_factory) -> Path:
    """A tiny-width PaliGemma 1 with the real 257,152-token vocabulary and tokenizer layout."""
    return write_tiny_hf(tmp_path_factory.mktemp("real_vocab") / "hf", version=1, vocab_size=REAL_VOCAB_SIZE)


@pytest.mark.parametrize("vocab", ["tiny", "real"])
def test_train_qlora_on_cpu_then_predict_with_its_adapter(
    vocab, tiny_hf_dir, synthetic_dataset, tmp_path, request
) -> None:
    base = tiny_hf_dir if vocab == "tiny" else request.getfixturevalue("real_vocab_hf_dir")
    out = tmp_path / "run"
    args = ["train", "--recipe", "qlora", "--device", "cpu", "--model", str(base)]
    args += ["--data", str(synthetic_dataset), "--out", str(out), "--examples", "8", "--batch-size", "4"]
    args += ["--eval-every", "1", "--eval-max-new-tokens", "4", "--no-progress", "--lr", "0.01"]
    assert main(args) == 0
    config = json.loads((out / "summary.json").read_text())
    assert config["steps"] == 2 and config["final_loss"] > 0
    adapter = out / "last" / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    # The adapter (trained over the 4-bit base) loads over the full-precision base; it moved
    # the model, and equals last/ (the same adapter folded into the base's weights).
    processor = load(base)[1]
    batch = _batch(processor)
    with torch.no_grad():
        plain = load(base)[0](**batch).logits
        over_base = load(adapter)[0](**batch).logits
        merged = load(out / "last")[0](**batch).logits
    assert not torch.allclose(over_base, plain, atol=1e-4)
    torch.testing.assert_close(over_base, merged, rtol=1e-4, atol=1e-4)

    # predict with the adapter folder: the same answer as with last/.
    image = next((synthetic_dataset / "dataset").glob("*.jpg"))
    texts = []
    for name, model in (("adapter", adapter), ("merged", out / "last")):
        args = ["predict", "--model", str(model), str(image), "--out", str(tmp_path / name)]
        assert main([*args, "--no-progress", "--max-new-tokens", "8"]) == 0
        texts.append(json.loads((tmp_path / name / "json" / f"{image.name}.json").read_text())["text"])
    assert texts[0] and texts[0] == texts[1]
