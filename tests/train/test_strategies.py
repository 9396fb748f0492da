"""Trainable-parameter selection, dtypes, LoRA merge (QLoRA: tests/train/test_qlora.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from paligemma_xray.errors import ConfigError
from paligemma_xray.model.tiny import tiny_model
from paligemma_xray.train.recipes import preset
from paligemma_xray.train.strategies import merged_state_dict, prepare_model, unwrap, vision_frozen

CPU = torch.device("cpu")


def test_big_vision_trains_attention_projections_only() -> None:
    model, _ = tiny_model(version=1)
    model = prepare_model(model, preset("big-vision"), CPU, bf16=False)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    depth = model.config.text_config.num_hidden_layers
    expected = sorted(
        f"model.language_model.layers.{i}.self_attn.{w}_proj.weight" for i in range(depth) for w in "qkvo"
    )
    assert trained == expected
    assert vision_frozen(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_frozen_weights_bf16_trainable_float32_buffers_untouched() -> None:
    model, _ = tiny_model(version=2)
    inv_freq = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    model = prepare_model(model, preset("frozen-vision"), CPU, bf16=True)
    for name, p in model.named_parameters():
        in_language_model = ".language_model." in name
        assert p.requires_grad == in_language_model, name
        assert p.dtype == (torch.float32 if in_language_model else torch.bfloat16), name
    for name, b in model.named_buffers():
        if name in inv_freq:
            assert b.dtype == torch.float32 and torch.equal(b, inv_freq[name])
    assert vision_frozen(model)


def test_full_trains_everything() -> None:
    model, _ = tiny_model(version=1)
    config = dataclasses.replace(preset("full"), activation_checkpointing=False)
    model = prepare_model(model, config, CPU, bf16=False)
    assert all(p.requires_grad for p in model.parameters())
    assert not vision_frozen(model)


def test_lora_adapts_language_model_only_and_merges_exactly() -> None:
    model, _ = tiny_model(version=1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = prepare_model(model, preset("lora"), CPU, bf16=False)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".language_model." in n for n in trained)
    assert not any("vision_tower" in n for n in trained)
    with torch.no_grad():  # make the adapters non-zero (B starts at 0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    merged = merged_state_dict(peft_model, base_state)
    fresh, _ = tiny_model(version=1)
    fresh.load_state_dict(merged)
    ids = torch.tensor([[2, 5, 7, 9]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    core = unwrap(peft_model)
    with torch.no_grad():
        expected = core.model(**inputs).last_hidden_state
        got = fresh.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(
        merged["model.language_model.layers.0.self_attn.q_proj.weight"],
        base_state["model.language_model.layers.0.self_attn.q_proj.weight"],
    )


def test_lora_targets_that_match_nothing() -> None:
    model, _ = tiny_model(version=1)
    config = preset("lora")
    config.lora_targets = ["no_such_proj"]
    with pytest.raises(ConfigError, match="does not fit"):
        prepare_model(model, config, CPU, bf16=False)


def test_full_recipe_checkpoints_activations_without_a_deprecation_warning() -> None:
    import warnings

    model, _ = tiny_model(version=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # every `--recipe full` used to warn
        model = prepare_model(model, preset("full"), CPU, bf16=False)
    core = unwrap(model)
    enabled = getattr(core, "is_activation_checkpointing", None)
    assert enabled if enabled is not None else core.is_gradient_checkpointing
