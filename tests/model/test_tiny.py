"""Tiny configs and models: small, shaped to catch reshape bugs, parameterisable."""

from __future__ import annotations

import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray.model.bigvision import Dims, families, iter_layers, make_config
from paligemma_xray.model.tiny import TINY_VOCAB_SIZE, tiny_config


@pytest.mark.parametrize("version", [1, 2])
def test_default_shapes_catch_reshape_bugs(version):
    text = tiny_config(version).text_config
    assert text.num_attention_heads * text.head_dim != text.hidden_size
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.vocab_size == TINY_VOCAB_SIZE
    assert text.model_type == ("gemma" if version == 1 else "gemma2")


def test_models_run_forward(tiny_model_v1, tiny_model_v2):
    for model, processor in (tiny_model_v1, tiny_model_v2):
        n = processor.image_seq_length
        ids = torch.tensor([[processor.image_token_id] * n + [2, 10, 108, 1]])
        with torch.no_grad():
            out = model(
                input_ids=ids, pixel_values=torch.zeros(1, 3, 28, 28), token_type_ids=torch.zeros_like(ids)
            )
        assert out.logits.shape == (1, n + 4, TINY_VOCAB_SIZE)
        assert torch.isfinite(out.logits).all()
        assert sum(p.numel() for p in model.parameters()) < 300_000


def test_config_is_parameterisable_for_a_million_parameter_model():
    config = tiny_config(
        2,
        width=128,
        depth=4,
        heads=4,
        kv_heads=2,
        head_dim=32,
        mlp_dim=256,
        vision_width=96,
        vision_depth=3,
        vision_heads=4,
        vision_mlp_dim=192,
        image_size=56,
    )
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert config.vision_config.image_size == 56 and config.text_config.num_image_tokens == 16


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_config(1, image_size=30)
    with pytest.raises(ValueError, match="kv_heads"):
        tiny_config(2, heads=4, kv_heads=3)


# Released shapes (from the checkpoints' arrays): the table must cover every HF parameter.
REAL = {
    "pg1-3b-224": Dims(1, 257152, 2048, 18, 8, 1, 256, 16384, 1152, 27, 16, 4304, 14, 224),
    "pg2-3b-448": Dims(2, 257152, 2304, 26, 8, 4, 256, 9216, 1152, 27, 16, 4304, 14, 448),
    "pg2-28b-896": Dims(2, 257152, 4608, 46, 32, 16, 128, 36864, 1152, 27, 16, 4304, 14, 896),
}


@pytest.mark.parametrize("name", list(REAL))
def test_mapping_table_covers_real_sizes(name):
    dims = REAL[name]
    config = make_config(dims)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    mapped = {}
    for family in families(dims, qkv=dims.kv_heads == dims.heads):
        layers = iter_layers(family, dims)
        bv = torch.empty(family.shape(dims), device="meta")
        for layer in layers:
            for hf, tensor in zip(family.hf, family.to_hf(bv, dims)):
                mapped[hf.format(i=layer)] = tuple(tensor.shape)
    assert mapped == expected
    assert config.text_config.num_image_tokens == (dims.image_size // 14) ** 2
    assert config.image_token_id == 257152
    if dims.version == 2:
        assert config.text_config.query_pre_attn_scalar == (144 if dims.width == 4608 else 256)
