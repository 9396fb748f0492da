"""The npz → HF mapping is RIGHT, not only invertible.

Every check computes something directly from the npz arrays in big_vision's own einsum form
(``BTD,NDH->BTNH`` etc., float64 numpy) and compares it with the converted HF module. The
last tests run a complete numpy PaliGemma forward written the way big_vision writes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paligemma_xray.model import load
from paligemma_xray.model.tiny import write_tiny_npz

ATOL = 2e-5


# (version, write_tiny_npz keywords): kv_heads < heads by default; a fused-qkv PaliGemma 1 of
# other sizes (42 px = 9 image tokens, 3 layers, head_dim 24) and a per-layer PaliGemma 2.
SHAPES = {
    "pg1": (1, {}),
    "pg2": (2, {}),
    "pg1-qkv-42px": (1, {"qkv": True, "image_size": 42, "depth": 3, "heads": 2, "head_dim": 24}),
    "pg2-unscanned-gqa": (2, {"scanned": False, "heads": 6, "kv_heads": 3, "head_dim": 8, "width": 36}),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, tmp_path_factory):
    """(version, npz arrays as float64 dict without params/, stacked, HF model, processor)."""
    version, kwargs = SHAPES[request.param]
    folder = tmp_path_factory.mktemp(f"mapping-{request.param}")
    npz, _ = write_tiny_npz(folder / "m.npz", version=version, seed=version, **kwargs)
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k.removeprefix("params/"): data[k].astype(np.float64) for k in data.files}
    model, processor = load(npz, dtype="float32", progress=False)
    return version, _stack(arrays), model, processor


def _stack(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unscanned keys (``layers/3/…``) → big_vision's scanned form, so the references index [i]."""
    import re

    out, layers = {}, {}
    for key, value in arrays.items():
        match = re.match(r"^(img/Transformer/encoderblock|llm/layers)[_/](\d+)/(.*)$", key)
        if match:
            layers.setdefault(f"{match.group(1)}/{match.group(3)}", {})[int(match.group(2))] = value
        else:
            out[key] = value
    for key, per_layer in layers.items():
        out[key] = np.stack([per_layer[i] for i in range(len(per_layer))])
    return out


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32))


def _close(hf: torch.Tensor, ref: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(hf.detach().double().numpy(), ref, atol=atol, rtol=1e-4)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _rms_norm(x, scale):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _rope(x, positions):  # big_vision's _apply_rope: halves, max_wavelength 10_000
    head_dim = x.shape[-1]
    timescale = 10_000 ** (2 * np.arange(head_dim // 2) / head_dim)
    radians = (positions[..., None] / timescale)[:, :, None, :]
    sin, cos = np.sin(radians), np.cos(radians)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --- vision tower -------------------------------------------------------------------------


def _patchify(pixels_nhwc, kernel, bias):  # the patch embedding as a stride-P HWIO convolution
    b, r, _, c = pixels_nhwc.shape
    p = kernel.shape[0]
    patches = pixels_nhwc.reshape(b, r // p, p, r // p, p, c)
    out = np.einsum("bipjqc,pqco->bijo", patches, kernel) + bias
    return out.reshape(b, -1, kernel.shape[-1])


def _vit_attention(x, a, i):
    pre = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    q = np.einsum("BTD,DNH->BTNH", x, a[pre + "query/kernel"][i]) + a[pre + "query/bias"][i]
    k = np.einsum("BTD,DNH->BTNH", x, a[pre + "key/kernel"][i]) + a[pre + "key/bias"][i]
    v = np.einsum("BTD,DNH->BTNH", x, a[pre + "value/kernel"][i]) + a[pre + "value/bias"][i]
    probs = _softmax(np.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1]))
    out = np.einsum("BNTS,BSNH->BTNH", probs, v)
    return np.einsum("BTNH,NHD->BTD", out, a[pre + "out/kernel"][i]) + a[pre + "out/bias"][i]


def _vit_mlp(x, a, i):
    pre = "img/Transformer/encoderblock/MlpBlock_0/"
    h = _gelu_tanh(x @ a[pre + "Dense_0/kernel"][i] + a[pre + "Dense_0/bias"][i])
    return h @ a[pre + "Dense_1/kernel"][i] + a[pre + "Dense_1/bias"][i]


def _vit(pixels_nhwc, a):
    x = _patchify(pixels_nhwc, a["img/embedding/kernel"], a["img/embedding/bias"]) + a["img/pos_embedding"]
    blk = "img/Transformer/encoderblock/"
    for i in range(a[blk + "LayerNorm_0/scale"].shape[0]):
        x = x + _vit_attention(
            _layer_norm(x, a[blk + "LayerNorm_0/scale"][i], a[blk + "LayerNorm_0/bias"][i]), a, i
        )
        x = x + _vit_mlp(
            _layer_norm(x, a[blk + "LayerNorm_1/scale"][i], a[blk + "LayerNorm_1/bias"][i]), a, i
        )
    x = _layer_norm(x, a["img/Transformer/encoder_norm/scale"], a["img/Transformer/encoder_norm/bias"])
    return x @ a["img/head/kernel"] + a["img/head/bias"]


def _pixels(processor, seed=0):
    size = processor.image_processor.size["height"]
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (2, size, size, 3))


def test_patch_embedding_is_the_hwio_convolution(converted):
    _, a, model, processor = converted
    pixels = _pixels(processor)
    hf = model.model.vision_tower.embeddings.patch_embedding(_t(pixels).permute(0, 3, 1, 2))
    ref = _patchify(pixels, a["img/embedding/kernel"], a["img/embedding/bias"])
    _close(hf.flatten(2).transpose(1, 2), ref)
    full = model.model.vision_tower.embeddings(_t(pixels).permute(0, 3, 1, 2))
    _close(full, ref + a["img/pos_embedding"])


def test_vision_attention_qkv_and_out(converted):
    _, a, model, _ = converted
    layer = model.model.vision_tower.encoder.layers[1]
    x = np.random.default_rng(1).standard_normal((2, 4, a["img/embedding/bias"].shape[0]))
    _close(layer.self_attn(_t(x))[0], _vit_attention(x, a, 1))
    pre = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    q = np.einsum("BTD,DNH->BTNH", x, a[pre + "query/kernel"][1]) + a[pre + "query/bias"][1]
    _close(layer.self_attn.q_proj(_t(x)).reshape(q.shape), q)


def test_vision_layer_norms_and_mlp(converted):
    _, a, model, _ = converted
    layer = model.model.vision_tower.encoder.layers[0]
    x = np.random.default_rng(2).standard_normal((2, 4, a["img/embedding/bias"].shape[0]))
    blk = "img/Transformer/encoderblock/"
    _close(
        layer.layer_norm1(_t(x)),
        _layer_norm(x, a[blk + "LayerNorm_0/scale"][0], a[blk + "LayerNorm_0/bias"][0]),
    )
    _close(
        layer.layer_norm2(_t(x)),
        _layer_norm(x, a[blk + "LayerNorm_1/scale"][0], a[blk + "LayerNorm_1/bias"][0]),
    )
    _close(layer.mlp(_t(x)), _vit_mlp(x, a, 0))
    post = model.model.vision_tower.post_layernorm(_t(x))
    _close(
        post, _layer_norm(x, a["img/Transformer/encoder_norm/scale"], a["img/Transformer/encoder_norm/bias"])
    )


def test_vision_tower_and_projector(converted):
    _, a, model, processor = converted
    pixels = _pixels(processor, seed=3)
    with torch.no_grad():
        hf = model.model.get_image_features(_t(pixels).permute(0, 3, 1, 2)).pooler_output
    _close(hf, _vit(pixels, a), atol=1e-4)  # image features are NOT rescaled


# --- Gemma decoder --------------------------------------------------------------------------


def _attn_weights(a, i):
    """(q (N,D,H), k (K,D,H), v (K,D,H)) from kv_einsum or qkv_einsum."""
    if "llm/layers/attn/qkv_einsum/w" in a:
        w = a["llm/layers/attn/qkv_einsum/w"][i]
        return w[0], w[1], w[2]
    kv = a["llm/layers/attn/kv_einsum/w"][i]
    return a["llm/layers/attn/q_einsum/w"][i], kv[0], kv[1]


def _gemma_attention(x, a, i, positions, mask, version):
    q_w, k_w, v_w = _attn_weights(a, i)
    q = np.einsum("BTD,NDH->BTNH", x, q_w)
    k = np.einsum("BSD,KDH->BSKH", x, k_w)
    v = np.einsum("BSD,KDH->BSKH", x, v_w)
    q, k = _rope(q, positions), _rope(k, positions)
    q = q * q.shape[-1] ** -0.5  # rsqrt_head_dim (query_pre_attn_scalar = head_dim)
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    q = q.reshape(b, t, k.shape[2], groups, h)
    logits = np.einsum("BTKGH,BSKH->BKGTS", q, k)
    if version == 2:
        logits = np.tanh(logits / 50.0) * 50.0
    logits = np.where(mask[:, None, None], logits, -2.3819763e38)
    enc = np.einsum("BKGTS,BSKH->BTKGH", _softmax(logits), v).reshape(b, t, n, h)
    return np.einsum("BTNH,NHD->BTD", enc, a["llm/layers/attn/attn_vec_einsum/w"][i])


def _gemma_mlp(x, a, i):
    gating = a["llm/layers/mlp/gating_einsum"][i]
    gate = _gelu_tanh(np.einsum("BTD,DF->BTF", x, gating[0]))  # [0] through GELU
    up = np.einsum("BTD,DF->BTF", x, gating[1])
    return np.einsum("BTF,FD->BTD", gate * up, a["llm/layers/mlp/linear"][i])


def _gemma(x, a, positions, mask, version):
    lay = "llm/layers/"
    for i in range(a[lay + "pre_attention_norm/scale"].shape[0]):
        attn = _gemma_attention(
            _rms_norm(x, a[lay + "pre_attention_norm/scale"][i]), a, i, positions, mask, version
        )
        if version == 2:
            attn = _rms_norm(attn, a[lay + "post_attention_norm/scale"][i])
        x = x + attn
        out = _gemma_mlp(_rms_norm(x, a[lay + "pre_ffw_norm/scale"][i]), a, i)
        if version == 2:
            out = _rms_norm(out, a[lay + "post_ffw_norm/scale"][i])
        x = x + out
    logits = _rms_norm(x, a["llm/final_norm/scale"]) @ a["llm/embedder/input_embedding"].T
    return np.tanh(logits / 30.0) * 30.0 if version == 2 else logits


def _width(a):
    return a["llm/embedder/input_embedding"].shape[1]


def test_decoder_projections_q_kv_o(converted):
    _, a, model, _ = converted
    attn = model.model.language_model.layers[1].self_attn
    x = np.random.default_rng(4).standard_normal((2, 5, _width(a)))
    q_w, k_w, v_w = _attn_weights(a, 1)
    _close(attn.q_proj(_t(x)).reshape(2, 5, *q_w.shape[::2]), np.einsum("BTD,NDH->BTNH", x, q_w))
    _close(attn.k_proj(_t(x)).reshape(2, 5, *k_w.shape[::2]), np.einsum("BSD,KDH->BSKH", x, k_w))
    _close(attn.v_proj(_t(x)).reshape(2, 5, *v_w.shape[::2]), np.einsum("BSD,KDH->BSKH", x, v_w))
    n, h, _ = a["llm/layers/attn/attn_vec_einsum/w"][1].shape
    enc = np.random.default_rng(5).standard_normal((2, 5, n, h))
    _close(attn.o_proj(_t(enc).reshape(2, 5, n * h)),
           np.einsum("BTNH,NHD->BTD", enc, a["llm/layers/attn/attn_vec_einsum/w"][1]))  # fmt: skip


def test_decoder_attention_with_rope_and_softcap(converted):
    version, a, model, _ = converted
    lm = model.model.language_model
    x = np.random.default_rng(6).standard_normal((1, 6, _width(a)))
    positions = np.arange(6)[None] + 1.0
    mask = np.tril(np.ones((6, 6), bool))[None]
    pos_t = torch.from_numpy(positions).long()
    cos_sin = lm.rotary_emb(_t(x), pos_t)
    causal = torch.zeros(1, 1, 6, 6).masked_fill(~torch.from_numpy(mask[:, None]), float("-inf"))
    with torch.no_grad():
        hf = lm.layers[0].self_attn(_t(x), position_embeddings=cos_sin, attention_mask=causal)[0]
    _close(hf, _gemma_attention(x, a, 0, positions, mask, version), atol=1e-4)


def test_gated_mlp_and_rms_norms(converted):
    version, a, model, _ = converted
    layer = model.model.language_model.layers[0]
    x = np.random.default_rng(7).standard_normal((2, 3, _width(a)))
    _close(layer.mlp(_t(x)), _gemma_mlp(x, a, 0), atol=1e-4)
    lay = "llm/layers/"
    _close(layer.input_layernorm(_t(x)), _rms_norm(x, a[lay + "pre_attention_norm/scale"][0]))
    if version == 1:
        _close(layer.post_attention_layernorm(_t(x)), _rms_norm(x, a[lay + "pre_ffw_norm/scale"][0]))
    else:
        _close(layer.post_attention_layernorm(_t(x)), _rms_norm(x, a[lay + "post_attention_norm/scale"][0]))
        _close(layer.pre_feedforward_layernorm(_t(x)), _rms_norm(x, a[lay + "pre_ffw_norm/scale"][0]))
        _close(layer.post_feedforward_layernorm(_t(x)), _rms_norm(x, a[lay + "post_ffw_norm/scale"][0]))
    _close(model.model.language_model.norm(_t(x)), _rms_norm(x, a["llm/final_norm/scale"]))


def test_embedding_is_scaled_by_sqrt_width_and_tied_to_the_head(converted):
    _, a, model, _ = converted
    ids = torch.tensor([[2, 5, 100, 700]])
    emb = a["llm/embedder/input_embedding"]
    _close(model.get_input_embeddings()(ids), emb[ids.numpy()] * np.sqrt(_width(a)))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.text_config.vocab_size == emb.shape[0]  # logits exactly big_vision's width


def test_whole_model_logits_equal_a_big_vision_style_forward(converted):
    """Image + prefix attend fully, suffix causally; positions 1-based as transformers numbers them."""
    version, a, model, processor = converted
    pixels = _pixels(processor, seed=8)
    n_img = processor.image_seq_length
    text = np.array([[2, 40, 300, 5, 650, 700, 1]] * 2)  # bos, prompt…, suffix…, eos
    text[1, 2] = 301
    n_prefix = n_img + 4  # image + bos + 3 prompt tokens
    emb = a["llm/embedder/input_embedding"]
    x = np.concatenate([_vit(pixels, a), emb[text] * np.sqrt(_width(a))], axis=1)
    t = x.shape[1]
    mask_ar = np.r_[np.zeros(n_prefix), np.ones(t - n_prefix)]
    cum = np.cumsum(mask_ar)
    mask = np.broadcast_to(cum[None, :] <= cum[:, None], (2, t, t))  # big_vision's make_attn_mask
    ref = _gemma(x, a, np.broadcast_to(np.arange(t) + 1.0, (2, t)), mask, version)

    input_ids = torch.cat([torch.full((2, n_img), processor.image_token_id), torch.from_numpy(text)], 1)
    token_type_ids = torch.from_numpy(np.broadcast_to(mask_ar, (2, t)).astype(np.int64))
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            pixel_values=_t(pixels).permute(0, 3, 1, 2),
            token_type_ids=token_type_ids,
            attention_mask=torch.ones_like(input_ids),
        ).logits
    assert torch.isfinite(logits).all()
    _close(logits, ref, atol=2e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_logits_change_when_any_single_family_changes(version, tmp_path):
    npz, spm = write_tiny_npz(tmp_path / "base.npz", version=version, seed=11)
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}

    def logits(path):
        model, processor = load(path, tokenizer=spm, progress=False)
        n_img = processor.image_seq_length
        ids = torch.tensor([[processor.image_token_id] * n_img + [2, 40, 300, 5, 650, 1]])
        types = torch.tensor([[0] * (n_img + 3) + [1] * 3])
        pixels = torch.linspace(-1, 1, 3 * 28 * 28).reshape(1, 3, 28, 28)
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels, token_type_ids=types).logits

    base = logits(npz)
    assert torch.isfinite(base).all()
    rng = np.random.default_rng(0)
    for key, value in arrays.items():
        changed = dict(arrays)
        changed[key] = (value + 0.5 * rng.standard_normal(value.shape)).astype(value.dtype)
        np.savez(tmp_path / "changed.npz", **changed)
        after = logits(tmp_path / "changed.npz")
        assert torch.isfinite(after).all(), key
        if key.endswith("MultiHeadDotProductAttention_0/key/bias"):
            # adds the same amount to every logit of a query: softmax cancels it, in big_vision too
            assert torch.allclose(after, base, atol=1e-4)
        else:
            assert (after - base).abs().max() > 1e-4, f"logits ignore {key}"
