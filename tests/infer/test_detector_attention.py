"""The fused attention path (SDPA) and its off switch (eager) give the same answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer.detector import Detector, set_attention


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("version", [1, 2])
def test_sdpa_and_eager_decode_the_same_tokens(version):
    from paligemma_xray.model.tiny import tiny_model

    model, processor = tiny_model(version=version, seed=1)
    # Prompts of different lengths: left padding, where a mask mistake would show.
    prompts = ["detect fracture", "detect fracture ; bone ; joint", "caption en"]
    answers = {}
    for attention in ("eager", "sdpa"):
        set_attention(model, attention)
        assert model.config.vision_config._attn_implementation == attention
        answers[attention] = Detector(model, processor).generate(_images(3), prompts, max_new_tokens=16)
    assert [g.tokens for g in answers["sdpa"]] == [g.tokens for g in answers["eager"]]
    for fused, reference in zip(answers["sdpa"], answers["eager"]):
        np.testing.assert_allclose(fused.logprobs, reference.logprobs, atol=1e-4)


def test_sdpa_and_eager_give_the_same_training_loss_and_gradients():
    from paligemma_xray.model.processing import build_batch
    from paligemma_xray.model.tiny import tiny_model
    from paligemma_xray.train.loss import suffix_loss

    model, processor = tiny_model(version=1, seed=2)
    model.train()
    suffixes = ["<loc0001><loc0002><loc0500><loc0600> fracture", ""]
    batch = build_batch(processor, _images(2), ["detect fracture", "detect fracture ; bone"], suffixes)
    results = {}
    for attention in ("eager", "sdpa"):
        set_attention(model, attention)
        model.zero_grad(set_to_none=True)
        loss = suffix_loss(model, batch).loss
        loss.backward()
        grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()
        results[attention] = (float(loss), grad)
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-4, atol=1e-6)


def test_an_unknown_attention_kernel_is_a_user_error(tiny_hf_dir, tmp_path, capsys):
    from paligemma_xray.cli import main

    with pytest.raises(ConfigError, match="attention must be one of"):
        Detector.load(tiny_hf_dir, device="cpu", attention="flash", progress=False)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    args = ["predict", "--model", str(tiny_hf_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    assert main([*args, "--attention", "eager", "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "o" / "json" / "a.png.json").is_file()
