"""An HF folder loaded in another dtype (float16 → bfloat16) is read tensor by tensor: same model."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray.model import build_batch, load, save_hf
from paligemma_xray.model.loading import cast


def test_float16_folder_loaded_in_bfloat16_equals_from_pretrained(tiny_hf_dir, tmp_path):
    model, processor = load(tiny_hf_dir, dtype="float16")
    folder = save_hf(cast(model, "float16"), processor, tmp_path / "f16")
    ours, _ = load(folder, dtype="bfloat16")
    reference = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        assert mine[name].dtype == tensor.dtype, name
        assert torch.equal(mine[name], tensor), name
    assert ours.lm_head.weight is ours.get_input_embeddings().weight  # tied, one Parameter
    assert ours.generation_config.eos_token_id == reference.generation_config.eos_token_id
    rope = [m.inv_freq for m in ours.modules() if hasattr(m, "inv_freq")]
    assert rope and all(f.dtype == torch.float32 for f in rope)
    batch = build_batch(processor, [Image.new("RGB", (40, 30), "gray")], ["detect fracture"])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        a = ours(**batch).logits
        b = reference(**batch).logits
    torch.testing.assert_close(a, b)


def test_npz_loaded_in_bfloat16_equals_float32_cast_after(tiny_npz):
    """big_vision's kernels are transposed on the way in (in blocks of columns): the same bits
    as loading in float32 and casting the finished model."""
    npz, tokenizer = tiny_npz
    direct, _ = load(npz, tokenizer=tokenizer, dtype="bfloat16")
    reference, _ = load(npz, tokenizer=tokenizer, dtype="float32")
    cast(reference, "bfloat16")
    mine, theirs = direct.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        assert mine[name].is_contiguous(), name
        assert torch.equal(mine[name], tensor), name
