"""End-to-end proof that a converted big_vision checkpoint computes big_vision's logits.

The reference below is a float64 numpy transcription of big_vision's own PaliGemma forward
pass, written from its source and NOT from transformers', so that the two are independent:

* ``big_vision/models/proj/paligemma/paligemma.py`` — ``Model.__call__``: image tokens then
  text tokens, ``make_attn_mask`` (cumulative ``mask_ar``: full attention over image+prefix,
  causal over the suffix), text logits = logits after the image tokens. The image embeddings
  (``embed_image``) enter the LLM as they come out of the ViT head: NOT multiplied by
  sqrt(width), unlike the text embeddings (``Embedder.encode``).
* ``big_vision/models/vit.py`` (``pool_type="none"``, ``num_classes`` = LLM width) — conv
  stem (HWIO, stride = patch, VALID), learned ``pos_embedding``, pre-LN ``Encoder1DBlock``
  (flax ``LayerNorm`` eps 1e-6, ``MultiHeadDotProductAttention`` with biases and queries
  scaled by head_dim**-0.5, ``MlpBlock`` with ``nn.gelu`` = tanh approximation),
  ``encoder_norm``, then the ``head`` Dense applied to every token.
* ``big_vision/models/ppp/gemma.py`` (via ``proj/paligemma/gemma_bv.py``) — ``Embedder``
  (encode × sqrt(width), decode = x @ table.T), ``RMSNorm`` (× (1 + scale), eps 1e-6),
  ``_apply_rope`` (max_wavelength 10 000, half-split rotation, positions = arange(seq) from
  0), ``Attention`` (``qkv_einsum`` when kv_heads == heads else ``q_einsum`` + ``kv_einsum``;
  query × head_dim**-0.5 ("rsqrt_head_dim"); queries grouped "B T (K G) H"; Gemma 2:
  attention logits soft-capped at 50), ``FeedForward`` (gelu(x@g[0]) * (x@g[1]) @ linear),
  ``Block`` (Gemma 2 ``post_norms``: post_attention_norm / post_ffw_norm), ``final_norm``,
  Gemma 2 final-logit soft-cap (30, the ``gemma2_*`` variants' default, which the project
  keeps by default; see ``paligemma_xray.model.bigvision``). The Gemma 2 parts were read in
  the Gemma-2-capable version of ``ppp/gemma.py`` (big_vision fork andsteing/big_vision).

The checkpoints are written here with plain ``np.savez`` under big_vision's parameter names
(hard-coded, not taken from the project's mapping table), in float32, float16 and bfloat16
(raw ``|V2`` voids). Every array is random, so each one moves the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from paligemma_xray.model import load
from paligemma_xray.model.tiny import TINY_VOCAB_SIZE, tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# Checkpoint shapes


@dataclass(frozen=True)
class Spec:
    version: int  # 1: Gemma, 2: Gemma 2
    width: int
    heads: int
    kv_heads: int  # == heads → big_vision stores qkv_einsum
    head_dim: int
    image_size: int
    patch: int = 14
    depth: int = 2
    mlp_dim: int = 64
    vision_width: int = 32
    vision_heads: int = 2
    vision_depth: int = 2
    vision_mlp_dim: int = 48
    vocab: int = TINY_VOCAB_SIZE  # must equal the tokenizer's size
    dtype: str = "float32"  # as stored in the npz
    prefix: str = "params/"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


CASES = {
    # heads*head_dim = 64 != width 48; multi-query (1 kv head); 4 image tokens
    "pg1-mqa-28px-f32": Spec(1, width=48, heads=4, kv_heads=1, head_dim=16, image_size=28),
    # kv_heads == heads → qkv_einsum; 36 != 40; 9 image tokens; bf16 voids; no params/ prefix
    "pg1-qkv-42px-bf16": Spec(1, width=40, heads=3, kv_heads=3, head_dim=12, image_size=42,
                              dtype="bfloat16", prefix=""),
    # Gemma 2, grouped-query (2 kv heads for 4), patch 7 → 16 image tokens, float16 file
    "pg2-gqa-28px-p7-f16": Spec(2, width=48, heads=4, kv_heads=2, head_dim=16, image_size=28, patch=7,
                                dtype="float16"),
    # Gemma 2, 4 heads / 2 kv heads, float32, 3 layers
    "pg2-gqa-28px-f32": Spec(2, width=48, heads=4, kv_heads=2, head_dim=16, image_size=28, depth=3),
    # Gemma 2, qkv_einsum, 48 != 32, 9 image tokens, bf16 voids
    "pg2-qkv-42px-bf16": Spec(2, width=32, heads=2, kv_heads=2, head_dim=24, image_size=42,
                              dtype="bfloat16", prefix=""),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Random checkpoints in big_vision's layout (names from vit.py / gemma.py module names)


def random_params(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """Scanned big_vision parameters (float32), flat ``/`` keys without ``params/``.

    Scales keep activations O(1) but put the nonlinear parts to work: text embeddings ~ N(0,1)
    rows (so logits reach the final soft-cap), large enough query/key weights that attention
    logits reach the attention soft-cap, norm scales visibly away from their neutral value.
    """
    rng = np.random.default_rng(seed)
    s = spec

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    vw, vl, vh, vm = s.vision_width, s.vision_depth, s.vision_heads, s.vision_mlp_dim
    vhd = vw // vh
    blk = "img/Transformer/encoderblock/"
    mha = blk + "MultiHeadDotProductAttention_0/"
    p = {
        "img/embedding/kernel": normal((s.patch, s.patch, 3, vw), 1 / math.sqrt(3 * s.patch**2)),
        "img/embedding/bias": normal((vw,), 0.1),
        "img/pos_embedding": normal((1, s.tokens, vw), 0.5),
        blk + "LayerNorm_0/scale": 1 + normal((vl, vw), 0.2),
        blk + "LayerNorm_0/bias": normal((vl, vw), 0.1),
        blk + "LayerNorm_1/scale": 1 + normal((vl, vw), 0.2),
        blk + "LayerNorm_1/bias": normal((vl, vw), 0.1),
        blk + "MlpBlock_0/Dense_0/kernel": normal((vl, vw, vm), 1 / math.sqrt(vw)),
        blk + "MlpBlock_0/Dense_0/bias": normal((vl, vm), 0.1),
        blk + "MlpBlock_0/Dense_1/kernel": normal((vl, vm, vw), 1 / math.sqrt(vm)),
        blk + "MlpBlock_0/Dense_1/bias": normal((vl, vw), 0.1),
        mha + "out/kernel": normal((vl, vh, vhd, vw), 1 / math.sqrt(vw)),
        mha + "out/bias": normal((vl, vw), 0.1),
        "img/Transformer/encoder_norm/scale": 1 + normal((vw,), 0.2),
        "img/Transformer/encoder_norm/bias": normal((vw,), 0.1),
        "img/head/kernel": normal((vw, s.width), 1 / math.sqrt(vw)),
        "img/head/bias": normal((s.width,), 0.1),
    }
    for name in ("query", "key", "value"):
        p[mha + f"{name}/kernel"] = normal((vl, vw, vh, vhd), 1.5 / math.sqrt(vw))
        p[mha + f"{name}/bias"] = normal((vl, vh, vhd), 0.1)

    d, n, k, h, f, ll = s.width, s.heads, s.kv_heads, s.head_dim, s.mlp_dim, s.depth
    p["llm/embedder/input_embedding"] = normal((s.vocab, d), 1.0)
    if k == n:
        p["llm/layers/attn/qkv_einsum/w"] = normal((ll, 3, n, d, h), 2.5 / math.sqrt(d))
    else:
        p["llm/layers/attn/q_einsum/w"] = normal((ll, n, d, h), 2.5 / math.sqrt(d))
        p["llm/layers/attn/kv_einsum/w"] = normal((ll, 2, k, d, h), 2.5 / math.sqrt(d))
    p["llm/layers/attn/attn_vec_einsum/w"] = normal((ll, n, h, d), 1 / math.sqrt(n * h))
    p["llm/layers/mlp/gating_einsum"] = normal((ll, 2, d, f), 1 / math.sqrt(d))
    p["llm/layers/mlp/linear"] = normal((ll, f, d), 1 / math.sqrt(f))
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if s.version == 2:
        norms += ["post_attention_norm", "post_ffw_norm"]
    for norm in norms:
        p[f"llm/layers/{norm}/scale"] = normal((ll, d), 0.3)
    p["llm/final_norm/scale"] = normal((d,), 0.3)
    return p


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _stored(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _bf16_bits(a).view("V2")  # big_vision's raw 2-byte voids
    return a.astype(dtype)


def _decoded(a: np.ndarray) -> np.ndarray:
    """What a stored array means, in float64 (independent of the project's reader)."""
    if a.dtype.kind == "V":
        assert a.dtype.itemsize == 2
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def write_checkpoint(folder: Path, spec: Spec, params: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """``np.savez`` in big_vision's layout (+ the tiny tokenizer beside it); returns (npz, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / "ckpt.npz"
    np.savez(npz, **{spec.prefix + key: _stored(value, spec.dtype) for key, value in params.items()})
    return npz, tiny_tokenizer(folder / "paligemma_tokenizer.model")


def read_back(npz: Path, prefix: str) -> dict[str, np.ndarray]:
    with np.load(npz, allow_pickle=False) as data:
        return {key.removeprefix(prefix): _decoded(data[key]) for key in data.files}


# ---------------------------------------------------------------------------------------------
# big_vision's forward pass in float64 numpy
#
# ``variant`` switches ONE convention away from big_vision's (used to prove that the comparison
# notices it). None = big_vision exactly.


def _gelu_tanh(x):  # flax nn.gelu(approximate=True), big_vision's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _layer_norm(x, scale, bias, eps=1e-6):  # flax nn.LayerNorm defaults
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def vit(p: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
    """big_vision vit.py ``_Model`` with pool_type="none" and a ``head``: (B,H,W,3) → (B,N,width)."""
    kernel = p["img/embedding/kernel"]  # HWIO
    ps = kernel.shape[0]
    b, hh, ww, c = image.shape
    gh, gw = hh // ps, ww // ps
    # nn.Conv(strides=patch, padding="VALID") on non-overlapping patches, then reshape [n, h*w, c]
    patches = image.reshape(b, gh, ps, gw, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, ps, ps, c)
    x = np.einsum("bnijc,ijcd->bnd", patches, kernel) + p["img/embedding/bias"]
    x = x + p["img/pos_embedding"]
    blk = "img/Transformer/encoderblock/"
    mha = blk + "MultiHeadDotProductAttention_0/"
    for i in range(p[blk + "LayerNorm_0/scale"].shape[0]):
        y = _layer_norm(x, p[blk + "LayerNorm_0/scale"][i], p[blk + "LayerNorm_0/bias"][i])
        q, k, v = (
            np.einsum("bld,dhk->blhk", y, p[mha + f"{name}/kernel"][i]) + p[mha + f"{name}/bias"][i]
            for name in ("query", "key", "value")
        )
        q = q / np.sqrt(q.shape[-1])  # flax dot_product_attention: query / sqrt(depth)
        weights = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k))
        o = np.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + np.einsum("bqhd,hdo->bqo", o, p[mha + "out/kernel"][i]) + p[mha + "out/bias"][i]
        y = _layer_norm(x, p[blk + "LayerNorm_1/scale"][i], p[blk + "LayerNorm_1/bias"][i])
        y = _gelu_tanh(y @ p[blk + "MlpBlock_0/Dense_0/kernel"][i] + p[blk + "MlpBlock_0/Dense_0/bias"][i])
        x = x + y @ p[blk + "MlpBlock_0/Dense_1/kernel"][i] + p[blk + "MlpBlock_0/Dense_1/bias"][i]
    x = _layer_norm(x, p["img/Transformer/encoder_norm/scale"], p["img/Transformer/encoder_norm/bias"])
    return x @ p["img/head/kernel"] + p["img/head/bias"]


def _rms_norm(x, scale, variant=None):
    var = np.mean(x**2, axis=-1, keepdims=True)
    normed = x / np.sqrt(var + 1e-6)
    return normed * (scale if variant == "rmsnorm_times_scale" else 1 + scale)


def _apply_rope(x, positions, variant=None, max_wavelength=10_000):
    """gemma.py ``_apply_rope``: x [B, L, H, D], positions [B, L]; rotates (first half, second half)."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * np.arange(half)
    timescale = max_wavelength**freq_exponents
    radians = (positions[..., None] / timescale[None, None, :])[..., None, :]
    sin, cos = np.sin(radians), np.cos(radians)
    if variant == "rope_interleaved":  # the other common convention: pairs (2i, 2i+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def make_attn_mask(input_mask, mask_ar):
    """paligemma.py ``make_attn_mask``: bool [B, N, N]."""
    cumsum = np.cumsum(mask_ar, axis=1)
    attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
    valid_mask = input_mask[:, None, :] & input_mask[:, :, None]
    return attn_mask & valid_mask


def gemma(p, x, positions, mask, version: int, variant=None) -> np.ndarray:
    """gemma.py ``Model.__call__`` on an already embedded sequence: (B, T, D) → logits (B, T, V)."""
    gemma2 = version == 2
    attn_softcap = 50.0 if gemma2 and variant != "no_attn_softcap" else None
    final_softcap = 30.0 if gemma2 and variant != "no_final_softcap" else None
    post_norms = gemma2 and variant != "no_post_norms"
    act = _gelu_erf if variant == "gelu_exact" else _gelu_tanh
    layers = "llm/layers/"
    qkv = layers + "attn/qkv_einsum/w" in p
    depth = p[layers + "pre_attention_norm/scale"].shape[0]
    b, t, width = x.shape
    for i in range(depth):
        y = _rms_norm(x, p[layers + "pre_attention_norm/scale"][i], variant)
        if qkv:
            q, k, v = np.einsum("BSD,CKDH->CBSKH", y, p[layers + "attn/qkv_einsum/w"][i])
        else:
            q = np.einsum("BTD,NDH->BTNH", y, p[layers + "attn/q_einsum/w"][i])
            k, v = np.einsum("BSD,CKDH->CBSKH", y, p[layers + "attn/kv_einsum/w"][i])
        heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
        q = _apply_rope(q, positions, variant)
        # "rsqrt_head_dim" (every PaliGemma variant except the 27B's "rsqrt_emb_per_head")
        q = q * (width // heads if variant == "query_scale_width_per_head" else head_dim) ** -0.5
        k = _apply_rope(k, positions, variant)
        if variant == "kv_groups_interleaved":  # head n ↔ kv head n % K instead of n // G
            q = q.reshape(b, t, heads // kv_heads, kv_heads, head_dim).transpose(0, 1, 3, 2, 4)
        else:  # einops "B T (K G) H -> B T K G H"
            q = q.reshape(b, t, kv_heads, heads // kv_heads, head_dim)
        logits = np.einsum("BTKGH,BSKH->BKGTS", q, k)
        if attn_softcap:
            logits = np.tanh(logits / attn_softcap) * attn_softcap
        logits = np.where(mask[:, None, None, :, :], logits, -2.3819763e38)
        probs = _softmax(logits)
        encoded = np.einsum("BKGTS,BSKH->BTKGH", probs, v)
        if variant == "kv_groups_interleaved":
            encoded = encoded.transpose(0, 1, 3, 2, 4)
        encoded = encoded.reshape(b, t, heads, head_dim)
        attn = np.einsum("BTNH,NHD->BTD", encoded, p[layers + "attn/attn_vec_einsum/w"][i])
        if post_norms:
            attn = _rms_norm(attn, p[layers + "post_attention_norm/scale"][i], variant)
        x = x + attn
        y = _rms_norm(x, p[layers + "pre_ffw_norm/scale"][i], variant)
        gating = p[layers + "mlp/gating_einsum"][i]
        if variant == "gate_up_swapped":
            gating = gating[::-1]
        y = (act(y @ gating[0]) * (y @ gating[1])) @ p[layers + "mlp/linear"][i]
        if post_norms:
            y = _rms_norm(y, p[layers + "post_ffw_norm/scale"][i], variant)
        x = x + y
    x = _rms_norm(x, p["llm/final_norm/scale"], variant)
    logits = x @ p["llm/embedder/input_embedding"].T
    if final_softcap:
        logits = np.tanh(logits / final_softcap) * final_softcap
    return logits


def paligemma(p, version, image, text, mask_ar, variant=None) -> np.ndarray:
    """paligemma.py ``Model.__call__``: image (B,H,W,3) in [-1,1], text int [B,T], mask_ar int [B,T]
    → text logits (B, T, V)."""
    zimg = vit(p, image)
    if variant == "image_tokens_times_sqrt_width":
        zimg = zimg * np.sqrt(zimg.shape[-1])
    width = p["llm/embedder/input_embedding"].shape[1]
    ztxt = p["llm/embedder/input_embedding"][text] * np.sqrt(width)  # Embedder.encode
    x = np.concatenate([zimg, ztxt], axis=1)
    n_img = zimg.shape[1]
    mask_ar = np.pad(mask_ar, ((0, 0), (n_img, 0)), constant_values=0)
    if variant == "causal_prefix":
        mask_ar = np.ones_like(mask_ar)
    elif variant == "bidirectional_suffix":
        mask_ar = np.zeros_like(mask_ar)
    input_mask = np.ones(mask_ar.shape, dtype=bool)  # __call__ passes no input_mask
    mask = make_attn_mask(input_mask, mask_ar)
    positions = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])  # default: arange from 0
    return gemma(p, x, positions, mask, version, variant)[:, n_img:]


# ---------------------------------------------------------------------------------------------
# One example batch, fed to both sides


@dataclass
class Batch:
    image: np.ndarray  # (B, H, W, 3) float32 in [-1, 1]
    text: np.ndarray  # (B, T) int: BOS + prefix + "\n" | suffix + EOS, right-padded
    mask_ar: np.ndarray  # (B, T) 0 on the prefix, 1 on the suffix (and padding)
    valid: np.ndarray  # (B, T) bool, False on padding


def make_batch(spec: Spec, seed: int = 1) -> Batch:
    """Two examples with different prefix/suffix lengths (the second right-padded)."""
    rng = np.random.default_rng(seed)
    lengths = [(5, 6), (3, 4)]  # (prefix tokens incl. BOS and "\n", suffix tokens incl. EOS)
    width = max(a + b for a, b in lengths)
    text = np.zeros((2, width), dtype=np.int64)
    mask_ar = np.ones((2, width), dtype=np.int64)
    valid = np.zeros((2, width), dtype=bool)
    for row, (n_prefix, n_suffix) in enumerate(lengths):
        body = rng.integers(4, spec.vocab, n_prefix + n_suffix)  # includes loc/seg ids
        body[0], body[n_prefix + n_suffix - 1] = 2, 1  # BOS first, EOS last
        text[row, : n_prefix + n_suffix] = body
        mask_ar[row, :n_prefix] = 0
        valid[row, : n_prefix + n_suffix] = True
    image = rng.uniform(-1, 1, (2, spec.image_size, spec.image_size, 3)).astype(np.float32)
    return Batch(image, text, mask_ar, valid)


def hf_logits(model, processor, spec: Spec, batch: Batch) -> np.ndarray:
    """Our converted model on the same inputs: (B, T, V) text logits (image positions dropped)."""
    n = spec.tokens
    assert processor.image_seq_length == n
    bsz = batch.text.shape[0]
    image_ids = np.full((bsz, n), model.config.image_token_id)
    input_ids = torch.from_numpy(np.concatenate([image_ids, batch.text], axis=1))
    attention_mask = torch.from_numpy(np.concatenate([np.ones((bsz, n), bool), batch.valid], 1)).long()
    # 0 on image + prefix, 1 on the suffix; padding 0 (masked out by attention_mask anyway)
    token_type_ids = torch.from_numpy(
        np.concatenate([np.zeros((bsz, n), np.int64), batch.mask_ar * batch.valid], axis=1)
    )
    pixel_values = torch.from_numpy(batch.image.transpose(0, 3, 1, 2).copy()).to(model.dtype)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )
    return out.logits[:, n:].double().numpy()


def max_error(ours: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> float:
    return float(np.abs(ours - reference)[valid].max())


def tolerance(reference: np.ndarray) -> float:
    """float32 accuracy relative to the logits' scale (measured: ~1e-6 of it; 20× margin)."""
    return 2e-5 * max(1.0, float(np.abs(reference).max()))


# ---------------------------------------------------------------------------------------------
# Fixtures: one written + converted checkpoint per case (module scope: built once)


@dataclass
class Converted:
    spec: Spec
    npz: Path
    tokenizer: Path
    params: dict[str, np.ndarray]  # float64, as stored in the file
    model: object
    processor: object
    batch: Batch
    reference: np.ndarray
    ours: np.ndarray


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def converted(request, tmp_path_factory) -> Converted:
    spec = CASES[request.param]
    npz, spm = write_checkpoint(
        tmp_path_factory.mktemp(request.param), spec, random_params(spec, seed=len(request.param))
    )
    params = read_back(npz, spec.prefix)
    # 16-bit files are compared in float32 (the stored values are exact in float32)
    dtype = None if spec.dtype == "float32" else "float32"
    model, processor = load(npz, tokenizer=spm, dtype=dtype, progress=False)
    batch = make_batch(spec)
    reference = paligemma(params, spec.version, batch.image.astype(np.float64), batch.text, batch.mask_ar)
    ours = hf_logits(model, processor, spec, batch)
    return Converted(spec, npz, spm, params, model, processor, batch, reference, ours)


# ---------------------------------------------------------------------------------------------
# Tests


def test_logits_match_big_vision(converted: Converted):
    c = converted
    assert c.ours.shape == c.reference.shape == (*c.batch.text.shape, c.spec.vocab)
    scale = float(np.abs(c.reference[c.batch.valid]).max())
    assert scale > 3.0  # logits are far from trivial (and reach the soft-cap's curved part)
    error = max_error(c.ours, c.reference, c.batch.valid)
    assert error <= tolerance(c.reference), f"max |Δlogit| {error:.3g} at logit scale {scale:.3g}"
    # the converted model also ranks tokens as big_vision does
    assert (c.ours.argmax(-1) == c.reference.argmax(-1))[c.batch.valid].all()


def test_config_read_from_shapes(converted: Converted):
    s, text = converted.spec, converted.model.config.text_config
    assert (text.model_type == "gemma2") == (s.version == 2)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (
        s.width, s.heads, s.kv_heads, s.head_dim,
    )  # fmt: skip
    assert converted.model.config.image_token_id >= s.vocab  # outside the text vocabulary
    vision = converted.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (s.image_size, s.patch)


# Each variant changes ONE convention of big_vision's; the converted model must disagree with
# every one of them by far more than the tolerance (so the comparison above is not blind to it).
VARIANTS_ALL = [
    "image_tokens_times_sqrt_width",  # big_vision does NOT scale image tokens
    "causal_prefix",  # prefix-LM mask: image+prefix attend fully
    "bidirectional_suffix",  # ... and the suffix causally
    "rope_interleaved",  # half-split rotation, not pairwise
    "rmsnorm_times_scale",  # (1 + scale)
    "gelu_exact",  # tanh approximation in Gemma's MLP
    "gate_up_swapped",  # gating_einsum[0] goes through GELU
]
VARIANTS_V2 = ["no_attn_softcap", "no_final_softcap", "no_post_norms", "query_scale_width_per_head"]


@pytest.mark.parametrize("variant", VARIANTS_ALL + VARIANTS_V2 + ["kv_groups_interleaved"])
def test_comparison_notices_each_convention(converted: Converted, variant):
    c = converted
    if variant in VARIANTS_V2 and c.spec.version == 1:
        pytest.skip("Gemma 2 only")
    if variant == "kv_groups_interleaved" and not 1 < c.spec.kv_heads < c.spec.heads:
        pytest.skip("needs 1 < kv_heads < heads")
    if variant == "query_scale_width_per_head" and c.spec.width // c.spec.heads == c.spec.head_dim:
        pytest.skip("same scale for this shape")
    b = c.batch
    wrong = paligemma(c.params, c.spec.version, b.image.astype(np.float64), b.text, b.mask_ar, variant)
    to_wrong = max_error(c.ours, wrong, b.valid)
    to_right = max_error(c.ours, c.reference, b.valid)
    assert to_wrong > 10 * to_right  # decisively closer to big_vision than to the variant
    if variant == "gelu_exact":  # tanh vs erf GELU differ by ≤ 4.7e-4: a small but visible shift
        assert to_wrong > tolerance(c.reference)
    else:
        assert to_wrong > 100 * tolerance(c.reference)


def test_final_softcap_off_matches_big_vision_without_it(converted: Converted):
    """big_vision's PaliGemma 2 colab builds the model with ``final_logits_softcap=0.0``;
    ``load(final_logit_softcapping=None)`` gives that model."""
    c = converted
    if c.spec.version != 2:
        pytest.skip("Gemma 2 only")
    dtype = None if c.spec.dtype == "float32" else "float32"
    model, processor = load(c.npz, tokenizer=c.tokenizer, dtype=dtype, final_logit_softcapping=None,
                            progress=False)  # fmt: skip
    b = c.batch
    reference = paligemma(c.params, 2, b.image.astype(np.float64), b.text, b.mask_ar, "no_final_softcap")
    assert float(np.abs(reference[b.valid]).max()) > 30  # beyond what a 30 soft-cap allows
    assert max_error(hf_logits(model, processor, c.spec, b), reference, b.valid) <= tolerance(reference)


def test_bf16_file_loads_in_bf16_and_stays_close(converted: Converted):
    """Without ``dtype``, a bf16 npz gives a bf16 model; its logits stay near big_vision's."""
    c = converted
    if c.spec.dtype != "bfloat16":
        pytest.skip("bf16 files only")
    model, processor = load(c.npz, tokenizer=c.tokenizer, progress=False)
    assert model.dtype == torch.bfloat16
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            assert buffer.dtype == torch.float32, name
    ours = hf_logits(model, processor, c.spec, c.batch)
    scale = float(np.abs(c.reference[c.batch.valid]).max())
    assert max_error(ours, c.reference, c.batch.valid) < 0.1 * scale


def test_perturbing_one_array_moves_the_logits(tmp_path):
    """The comparison is sensitive: a change to one element of one stored array changes our logits,
    and big_vision's in the same way."""
    spec = CASES["pg2-gqa-28px-f32"]
    params = random_params(spec, seed=7)
    batch = make_batch(spec)
    image = batch.image.astype(np.float64)
    npz, spm = write_checkpoint(tmp_path / "base", spec, params)
    model, processor = load(npz, tokenizer=spm, progress=False)
    base = hf_logits(model, processor, spec, batch)
    for key, index in [
        ("llm/layers/attn/kv_einsum/w", (spec.depth - 1, 1, 1, 3, 5)),  # last layer, v, kv head 1
        ("img/pos_embedding", (0, spec.tokens - 1, 2)),  # last image position
        ("llm/layers/post_ffw_norm/scale", (0, 7)),
    ]:
        changed = {k: v.copy() for k, v in params.items()}
        changed[key][index] += 1.0
        npz, spm = write_checkpoint(tmp_path / key.replace("/", "_"), spec, changed)
        model, processor = load(npz, tokenizer=spm, progress=False)
        ours = hf_logits(model, processor, spec, batch)
        reference = paligemma(read_back(npz, spec.prefix), spec.version, image, batch.text, batch.mask_ar)
        moved = max_error(ours, base, batch.valid)
        assert moved > 100 * tolerance(reference), f"{key}: logits moved only {moved:.3g}"
        assert max_error(ours, reference, batch.valid) <= tolerance(reference), key


def test_unscanned_big_vision_checkpoint(tmp_path):
    """big_vision with scan=False: ViT blocks under ``Transformer/encoderblock_{i}`` (vit.py names
    them so), Gemma blocks under ``layers/{i}`` (gemma.py pushes the scope ``str(layer)``)."""
    spec = CASES["pg1-mqa-28px-f32"]
    scanned = random_params(spec, seed=3)
    unscanned = {}
    for key, value in scanned.items():
        if key.startswith("img/Transformer/encoderblock/"):
            for i in range(spec.vision_depth):
                unscanned[key.replace("encoderblock/", f"encoderblock_{i}/")] = value[i]
        elif key.startswith("llm/layers/"):
            for i in range(spec.depth):
                unscanned[key.replace("llm/layers/", f"llm/layers/{i}/")] = value[i]
        else:
            unscanned[key] = value
    npz, spm = write_checkpoint(tmp_path, spec, unscanned)
    model, processor = load(npz, tokenizer=spm, progress=False)
    batch = make_batch(spec)
    reference = paligemma(scanned, spec.version, batch.image.astype(np.float64), batch.text, batch.mask_ar)
    ours = hf_logits(model, processor, spec, batch)
    assert max_error(ours, reference, batch.valid) <= tolerance(reference)


def test_spec_cases_cover_the_brief():
    """The cases span both versions, MQA/GQA and qkv_einsum, heads×head_dim ≠ width, two
    resolutions, and float32 / bfloat16 (|V2) files."""
    specs = list(CASES.values())
    assert {s.version for s in specs} == {1, 2}
    assert any(s.kv_heads == s.heads for s in specs) and any(s.kv_heads < s.heads for s in specs)
    assert all(s.heads * s.head_dim != s.width for s in specs)
    assert len({s.image_size for s in specs}) >= 2 and len({s.tokens for s in specs}) >= 3
    assert {"float32", "bfloat16"} <= {s.dtype for s in specs}
