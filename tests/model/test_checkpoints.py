"""Loading and saving: npz ⇄ torch bit-exact, HF folders, LoRA adapters, run folders, errors, CLI."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from paligemma_xray.cli import main
from paligemma_xray.errors import CheckpointError
from paligemma_xray.model import cast, load, load_lora, save_hf, save_lora, save_npz
from paligemma_xray.model.bigvision import make_config
from paligemma_xray.model.tiny import TINY_VOCAB_SIZE, tiny_dims, write_tiny_npz


def _npz_bytes(path) -> dict[str, tuple[str, tuple, bytes]]:
    with np.load(path, allow_pickle=False) as data:
        return {k: (data[k].dtype.str, data[k].shape, data[k].tobytes()) for k in data.files}


def _inputs(processor, seed=0):
    n = processor.image_seq_length
    ids = torch.tensor([[processor.image_token_id] * n + [2, 40, 300, 5, 650, 1]])
    types = torch.tensor([[0] * (n + 4) + [1] * 2])
    size = processor.image_processor.size["height"]
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"input_ids": ids, "token_type_ids": types, "pixel_values": pixels}


def _logits(model, processor):
    with torch.no_grad():
        return model(**_inputs(processor)).logits.float()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_npz_torch_npz_is_bit_exact(tmp_path, version, dtype):
    npz, _ = write_tiny_npz(tmp_path / "in.npz", version=version, dtype=dtype)
    model, _ = load(npz, progress=False)
    assert model.dtype == getattr(torch, dtype)
    out = save_npz(model, tmp_path / "out.npz", dtype=dtype, progress=False)
    assert _npz_bytes(out) == _npz_bytes(npz)
    if dtype == "bfloat16":  # stored as raw 2-byte voids, as big_vision does
        assert {v[0] for v in _npz_bytes(out).values()} == {"|V2"}


@pytest.mark.parametrize(
    "layout",
    [{"scanned": False}, {"prefix": ""}, {"qkv": True}],
    ids=["per-layer", "no-params-prefix", "qkv_einsum"],
)
def test_other_layouts_round_trip(tmp_path, layout):
    npz, _ = write_tiny_npz(tmp_path / "in.npz", version=2, dtype="float16", **layout)
    model, _ = load(npz, progress=False)
    out = save_npz(
        model, tmp_path / "out.npz", dtype="float16", progress=False,
        scanned=layout.get("scanned", True), prefix=layout.get("prefix", "params/"),
    )  # fmt: skip
    assert _npz_bytes(out) == _npz_bytes(npz)
    keys = list(_npz_bytes(out))
    assert any("qkv_einsum" in k for k in keys) == bool(layout.get("qkv"))


def test_a_loaded_16bit_model_saved_as_float32_is_exact(tmp_path):
    npz, _ = write_tiny_npz(tmp_path / "in.npz", version=1, dtype="bfloat16")
    model, _ = load(npz, dtype="float32", progress=False)
    out = save_npz(model, tmp_path / "out.npz", dtype="float32", progress=False)
    with np.load(npz) as a, np.load(out) as b:
        for key in a.files:
            widened = torch.from_numpy(a[key].view(np.int16)).view(torch.bfloat16).float().numpy()
            assert np.array_equal(widened, b[key]), key


def test_sizes_come_from_the_shapes(tmp_path):
    sizes = {
        "image_size": 56,
        "depth": 3,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 24,
        "width": 40,
        "mlp_dim": 72,
        "vision_width": 24,
        "vision_depth": 1,
        "vision_heads": 3,
        "vision_mlp_dim": 40,
    }
    npz, _ = write_tiny_npz(tmp_path / "odd.npz", version=2, **sizes)
    model, processor = load(npz, progress=False)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (3, 2, 1)
    assert (text.head_dim, text.hidden_size, text.intermediate_size) == (24, 40, 72)
    assert (vision.image_size, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        56,
        24,
        1,
        3,
    )
    assert vision.intermediate_size == 40 and not vision.vision_use_head
    assert text.model_type == "gemma2" and text.query_pre_attn_scalar == 24
    assert set(text.layer_types) == {"full_attention"} and text.sliding_window is None
    assert (text.attn_logit_softcapping, text.final_logit_softcapping) == (50.0, 30.0)
    assert processor.image_seq_length == 16 and processor.image_processor.size["height"] == 56
    assert model.config.image_token_id == TINY_VOCAB_SIZE == text.vocab_size


def test_rope_stays_float32_in_16_bit(tiny_npz):
    npz, _ = tiny_npz
    model, _ = load(npz, dtype="bfloat16", progress=False)
    assert model.dtype == torch.bfloat16
    rotary = model.model.language_model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    reference, _ = load(npz, dtype="float32", progress=False)
    assert torch.equal(rotary.inv_freq, reference.model.language_model.rotary_emb.inv_freq)
    casted = cast(reference, "float16")
    assert casted.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_meta_tensors_contiguous_and_tied_head(tmp_path, dtype):
    npz, _ = write_tiny_npz(tmp_path / "t.npz", version=2, dtype=dtype)
    model, processor = load(npz, progress=False)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(p.is_contiguous() for p in model.parameters())
    save_hf(model, processor, tmp_path / "hf")  # safetensors refuses strided views
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not model.training


def test_hf_folder_loads_in_plain_transformers(tmp_path, tiny_npz):
    model, processor = load(tiny_npz[0], progress=False)
    folder = save_hf(model, processor, tmp_path / "hf")
    assert (folder / "tokenizer.model").is_file()  # kept for a later npz export
    plain = PaliGemmaForConditionalGeneration.from_pretrained(folder)
    plain_processor = AutoProcessor.from_pretrained(folder)
    assert plain_processor.tokenizer.encode("<loc0007>", add_special_tokens=False) == [
        TINY_VOCAB_SIZE - 1152 + 7
    ]
    assert plain_processor.image_seq_length == processor.image_seq_length
    assert torch.equal(_logits(plain, processor), _logits(model, processor))
    ours, ours_processor = load(folder)
    assert torch.equal(_logits(ours, ours_processor), _logits(model, processor))


def test_hf_to_npz_round_trip_via_cli(tmp_path, tiny_npz, capsys):
    npz, _ = tiny_npz
    assert main(["convert", str(npz), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back" / "x.npz")]) == 0
    assert _npz_bytes(tmp_path / "back" / "x.npz") == _npz_bytes(npz)
    assert (tmp_path / "back" / "paligemma_tokenizer.model").is_file()
    assert main(["convert", str(npz), str(tmp_path / "half.npz"), "--dtype", "bfloat16"]) == 0
    assert {v[0] for v in _npz_bytes(tmp_path / "half.npz").values()} == {"|V2"}
    assert main(["convert", str(tmp_path / "nothing.npz"), str(tmp_path / "y")]) == 2
    assert "nothing.npz" in capsys.readouterr().err


def test_padded_hf_vocabulary_is_cut_back(tmp_path):
    # Like google/paligemma-3b-*: 257216 embedding rows for 257152 pieces + <image>.
    config = make_config(tiny_dims(1), hf_vocab=TINY_VOCAB_SIZE + 64)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config)
    out = save_npz(model, tmp_path / "cut.npz", progress=False)
    with np.load(out) as data:
        embedding = data["params/llm/embedder/input_embedding"]
    assert embedding.shape == (TINY_VOCAB_SIZE, 48)
    assert np.array_equal(embedding, model.get_input_embeddings().weight[:TINY_VOCAB_SIZE].detach().numpy())


def test_run_folder_prefers_best_then_last(tmp_path, tiny_hf_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_hf_dir, run / "last")
    model, _ = load(run)
    assert model.config.text_config.model_type == "gemma"
    from paligemma_xray.model.tiny import write_tiny_hf

    write_tiny_hf(run / "best", version=2)
    model, _ = load(run)
    assert model.config.text_config.model_type == "gemma2"


def test_progress_false_silences_transformers_bars_too(tmp_path, tiny_hf_dir, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    model, processor = load(tiny_hf_dir, progress=False)
    save_hf(model, processor, tmp_path / "copy", progress=False)
    assert capfd.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # the global switch is put back
    load(tmp_path / "copy")  # stderr is no terminal here: their redrawn bars stay off
    assert "Loading weights" not in capfd.readouterr().err
    monkeypatch.setattr("paligemma_xray.progress.is_terminal", lambda stream=None: True)
    load(tmp_path / "copy")
    assert "Loading weights" in capfd.readouterr().err


def test_lora_adapter_saves_loads_and_merges(tmp_path, tiny_hf_dir):
    from peft import LoraConfig, get_peft_model

    base, processor = load(tiny_hf_dir)
    reference = _logits(base, processor)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the adapter do something
    tuned = _logits(peft_model, processor)
    assert not torch.allclose(tuned, reference, atol=1e-4)
    adapter = save_lora(peft_model, tmp_path / "adapter", base=tiny_hf_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}

    merged, merged_processor = load(adapter)  # base found through adapter_config.json
    assert isinstance(merged, PaliGemmaForConditionalGeneration)
    assert torch.allclose(_logits(merged, merged_processor), tuned, atol=1e-4)
    unmerged, _ = load(adapter, merge_lora=False)
    assert hasattr(unmerged, "merge_and_unload")
    assert torch.allclose(_logits(unmerged, processor), tuned, atol=1e-5)
    fresh, _ = load(tiny_hf_dir)
    assert torch.allclose(_logits(load_lora(fresh, adapter, merge=True), processor), tuned, atol=1e-4)


# --- user mistakes name the file and what is wrong --------------------------------------------


def test_missing_tokenizer_is_explained(tmp_path):
    npz, spm = write_tiny_npz(tmp_path / "a.npz")
    spm.unlink()
    with pytest.raises(CheckpointError, match=r"a\.npz.*--tokenizer"):
        load(npz, progress=False)


def test_tokenizer_of_another_size_is_refused(tmp_path, tiny_tokenizer_path):
    npz, _ = write_tiny_npz(tmp_path / "a.npz", vocab_size=TINY_VOCAB_SIZE + 8)
    with pytest.raises(CheckpointError, match=f"{TINY_VOCAB_SIZE + 8} rows"):
        load(npz, tokenizer=tiny_tokenizer_path, progress=False)


def test_hf_folder_with_a_smaller_embedding_than_its_tokenizer_is_refused(tmp_path, tiny_hf_dir):
    # It used to load, then fail with an IndexError deep in the model on the first loc token.
    import shutil

    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_hf_dir)
    model.resize_token_embeddings(600)
    model.save_pretrained(tmp_path / "hf")
    for file in tiny_hf_dir.iterdir():
        if file.name.startswith(("tokenizer", "processor", "special_tokens")):
            shutil.copyfile(file, tmp_path / "hf" / file.name)
    with pytest.raises(CheckpointError, match=f"{TINY_VOCAB_SIZE} pieces.*only 600 rows"):
        load(tmp_path / "hf", progress=False)


def test_wrong_shape_names_the_key(tmp_path):
    npz, _ = write_tiny_npz(tmp_path / "a.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["params/llm/layers/mlp/linear"] = arrays["params/llm/layers/mlp/linear"][:, :-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"bad\.npz.*llm/layers/mlp/linear.*shape"):
        load(tmp_path / "bad.npz", progress=False)


def test_not_a_checkpoint(tmp_path, tiny_tokenizer_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.npz"):
        load(junk, tokenizer=tiny_tokenizer_path)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a PaliGemma"):
        load(tmp_path / "other.npz", tokenizer=tiny_tokenizer_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load(tmp_path / "empty")


def test_pickled_arrays_are_refused(tmp_path, tiny_tokenizer_path):
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as zf, zf.open("params/img/embedding/kernel.npy", "w") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="pickle"):
        load(tmp_path / "p.npz", tokenizer=tiny_tokenizer_path)


def test_adapter_without_base_is_explained(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/model"}))
    with pytest.raises(CheckpointError, match="/nowhere/model"):
        load(tmp_path)


def test_unscanned_key_spellings_and_mixed_layouts_load_alike(tmp_path):
    npz, spm = write_tiny_npz(tmp_path / "scanned.npz", version=2, seed=4)
    reference = _logits(*load(npz, progress=False))
    per_layer, _ = write_tiny_npz(tmp_path / "u" / "per_layer.npz", version=2, seed=4, scanned=False)
    with np.load(per_layer) as data:
        arrays = {k: data[k] for k in data.files}
    assert any(k.startswith("params/llm/layers/0/") for k in arrays)  # big_vision's scan=False names
    assert any(k.startswith("params/img/Transformer/encoderblock_0/") for k in arrays)
    underscored = {
        k.replace("llm/layers/", "llm/layers_", 1) if "llm/layers/" in k else k: v for k, v in arrays.items()
    }
    np.savez(tmp_path / "u" / "underscored.npz", **underscored)
    # vision tower scanned, decoder per layer
    with np.load(npz) as data:
        mixed = {k: data[k] for k in data.files if k.startswith("params/img/")}
    mixed.update({k: v for k, v in arrays.items() if k.startswith("params/llm/")})
    np.savez(tmp_path / "u" / "mixed.npz", **mixed)
    for name in ("per_layer.npz", "underscored.npz", "mixed.npz"):
        model, processor = load(tmp_path / "u" / name, tokenizer=spm, progress=False)
        assert torch.equal(_logits(model, processor), reference), name


def test_convert_checks_the_output_before_loading(tmp_path, tiny_npz, capsys):
    npz, _ = tiny_npz
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.npz").mkdir()
    for out in ("file", "folder.npz", "file/x.npz"):  # each used to end in a traceback
        assert main(["convert", str(npz), str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and out in err and "Traceback" not in err
