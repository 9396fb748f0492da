"""big_vision's PaliGemma checkpoint layout: THE one key-mapping table, shapes → config, npz I/O.

A big_vision ``.npz`` holds flat ``/``-joined keys (usually under ``params/``), with the layers
of each tower stacked on a leading axis ("scanned") or, unscanned (big_vision's
``scan=False``), under ``img/Transformer/encoderblock_{i}/`` and ``llm/layers/{i}/`` (also read:
``llm/layers_{i}/``); each tower may be scanned or not on its own.

:data:`FAMILIES` says, for every weight family, which transformers
parameter(s) it becomes and how (both directions); everything else in this package goes
through it.

Everything about the model's size is read from the arrays' shapes (:func:`infer_dims`), never
assumed. Conventions fixed once here (:func:`make_config`):

* Gemma 2: ``query_pre_attn_scalar`` = head_dim (big_vision's ``rsqrt_head_dim``), except for
  the 27B shape (width 4608, 32 heads of 128) whose big_vision variant scales by width/heads
  = 144; attention soft-cap 50; final-logit soft-cap 30 (big_vision's ``gemma2_*`` variants and
  the released PaliGemma 2 checkpoints; pass ``final_logit_softcapping=None`` to turn it off);
  every layer full attention (PaliGemma's Gemma 2 has no sliding window).
* Text vocabulary = the SentencePiece size (the npz embedding's rows); ``<image>`` takes the
  next id, outside the vocabulary, so logits have exactly big_vision's width.
* SigLIP: no attention-pooling head, LayerNorm eps 1e-6, tanh GELU, projection to the text
  width; image size = sqrt(position embeddings) × patch.

Example:

>>> import tempfile, pathlib
>>> from paligemma_xray.model.tiny import write_tiny_npz
>>> npz, _ = write_tiny_npz(pathlib.Path(tempfile.mkdtemp()) / "t.npz", version=2)
>>> with NpzArrays(npz) as arrays:
...     infer_dims(arrays).version
2
"""

from __future__ import annotations

import contextlib
import math
import mmap
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PaliGemmaConfig
from transformers.configuration_utils import PreTrainedConfig

from paligemma_xray.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# Dimensions and config


@dataclass(frozen=True)
class Dims:
    """Sizes of a PaliGemma model, as read from a checkpoint's shapes."""

    version: int  # 1: Gemma decoder, 2: Gemma 2 (post-norms present)
    vocab: int  # text vocabulary (SentencePiece pieces; 257152 for the real tokenizer)
    width: int
    depth: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp_dim: int
    patch: int
    image_size: int

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


def query_pre_attn_scalar(dims: Dims) -> int:
    """The divisor under the square root that scales Gemma 2 queries (see module notes)."""
    if (dims.width, dims.heads, dims.head_dim) == (4608, 32, 128):  # gemma2_27b: rsqrt_emb_per_head
        return dims.width // dims.heads
    return dims.head_dim


def make_config(
    dims: Dims,
    *,
    final_logit_softcapping: float | None = 30.0,
    query_scalar: int | None = None,
    hf_vocab: int | None = None,
) -> PaliGemmaConfig:
    """The transformers ``PaliGemmaConfig`` equivalent to big_vision's model of these sizes.

    ``hf_vocab`` (default: ``dims.vocab``) is the embedding's row count on the HF side;
    ``<image>`` always gets id ``dims.vocab``.
    """
    vocab = hf_vocab or dims.vocab
    text: dict = {
        "model_type": "gemma" if dims.version == 1 else "gemma2",
        "vocab_size": vocab,
        "hidden_size": dims.width,
        "intermediate_size": dims.mlp_dim,
        "num_hidden_layers": dims.depth,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
    }
    if dims.version == 1:
        text["hidden_act"] = "gelu_pytorch_tanh"
    else:
        text.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=query_scalar or query_pre_attn_scalar(dims),
            attn_logit_softcapping=50.0,
            final_logit_softcapping=final_logit_softcapping,
            sliding_window=None,
            layer_types=["full_attention"] * dims.depth,
        )
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": dims.vision_width,
        "intermediate_size": dims.vision_mlp_dim,
        "num_hidden_layers": dims.vision_depth,
        "num_attention_heads": dims.vision_heads,
        "patch_size": dims.patch,
        "image_size": dims.image_size,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
        "projection_dim": dims.width,
    }
    return PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=dims.vocab,
        vocab_size=vocab,
        projection_dim=dims.width,
        hidden_size=dims.width,
        # Not in the signature transformers declares, but taken (its strict dataclass config
        # passes extra keyword arguments on to PreTrainedConfig).
        pad_token_id=0,  # type: ignore[call-arg]
        tie_word_embeddings=True,
    )


def sub_configs(config: PaliGemmaConfig) -> tuple[PreTrainedConfig, PreTrainedConfig]:
    """``(text_config, vision_config)`` of a built config (transformers types them loosely,
    ``dict | PreTrainedConfig | None``, for what its constructor accepts)."""
    text, vision = config.text_config, config.vision_config
    if not isinstance(text, PreTrainedConfig) or not isinstance(vision, PreTrainedConfig):
        raise TypeError("a PaliGemmaConfig without its text and vision configs built")
    return text, vision


def dims_from_config(config: PaliGemmaConfig, vocab: int | None = None) -> Dims:
    """The :class:`Dims` of an HF config (``vocab``: text rows to keep; default up to ``<image>``)."""
    text, vision = sub_configs(config)
    hf_vocab = text.vocab_size
    return Dims(
        version=2 if text.model_type == "gemma2" else 1,
        vocab=vocab or min(hf_vocab, config.image_token_id),
        width=text.hidden_size,
        depth=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        mlp_dim=text.intermediate_size,
        vision_width=vision.hidden_size,
        vision_depth=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp_dim=vision.intermediate_size,
        patch=vision.patch_size,
        image_size=vision.image_size,
    )


# ---------------------------------------------------------------------------------------------
# The mapping table
#
# A family's ``bv`` key is relative to its tower (``img/`` or ``llm/``); per-layer families sit
# under the tower's layer group (``Transformer/encoderblock`` / ``layers``). ``to_hf`` turns
# ONE layer's big_vision array into the HF tensors (in the order of ``hf``); ``to_bv`` is its
# inverse. ``shape`` gives one layer's big_vision shape from the dims (used to validate).

Tensor = torch.Tensor
VISION_PREFIX = "model.vision_tower."
LANGUAGE_PREFIX = "model.language_model."


@dataclass(frozen=True)
class Family:
    tower: str  # "img" | "llm"
    bv: str
    hf: tuple[str, ...]  # may contain "{i}" (layer index)
    per_layer: bool
    shape: Callable[[Dims], tuple[int, ...]]
    to_hf: Callable[[Tensor, Dims], list[Tensor]]
    to_bv: Callable[[list[Tensor], Dims], Tensor]
    versions: tuple[int, ...] = (1, 2)
    kv: str = "any"  # "kv" (kv_einsum: kv_heads < heads) | "qkv" (qkv_einsum) | "any"


def _same(x: Tensor, d: Dims) -> list[Tensor]:
    return [x]


def _same_back(xs: list[Tensor], d: Dims) -> Tensor:
    return xs[0]


def _transpose(x: Tensor, d: Dims) -> list[Tensor]:
    return [x.T]


def _transpose_back(xs: list[Tensor], d: Dims) -> Tensor:
    return xs[0].T


def _q_to_hf(x: Tensor, d: Dims) -> Tensor:  # (N, D, H) -> (N*H, D)
    return x.permute(0, 2, 1).reshape(-1, x.shape[1])


def _q_to_bv(w: Tensor, heads: int, d: Dims) -> Tensor:  # (N*H, D) -> (N, D, H)
    return w.reshape(heads, d.head_dim, d.width).permute(0, 2, 1)


def _vision_qkv_back(xs: list[Tensor], d: Dims) -> Tensor:
    return xs[0].T.reshape(d.vision_width, d.vision_heads, d.vision_width // d.vision_heads)


def _vision_out_back(xs: list[Tensor], d: Dims) -> Tensor:
    return xs[0].T.reshape(d.vision_heads, d.vision_width // d.vision_heads, d.vision_width)


def _vision_width(d: Dims) -> tuple[int, ...]:
    return (d.vision_width,)


def _width(d: Dims) -> tuple[int, ...]:
    return (d.width,)


def _vision_head_dim(d: Dims) -> int:
    return d.vision_width // d.vision_heads


def _family(tower, bv, hf, per_layer, shape, to_hf, to_bv, **kw) -> Family:
    return Family(tower, bv, hf if isinstance(hf, tuple) else (hf,), per_layer, shape, to_hf, to_bv, **kw)


_ENC = VISION_PREFIX + "encoder.layers.{i}."
_DEC = LANGUAGE_PREFIX + "layers.{i}."

FAMILIES: tuple[Family, ...] = (
    # --- SigLIP vision tower -------------------------------------------------------------
    _family("img", "embedding/kernel", VISION_PREFIX + "embeddings.patch_embedding.weight", False,
            lambda d: (d.patch, d.patch, 3, d.vision_width),
            lambda x, d: [x.permute(3, 2, 0, 1)],  # HWIO -> OIHW
            lambda xs, d: xs[0].permute(2, 3, 1, 0)),
    _family("img", "embedding/bias", VISION_PREFIX + "embeddings.patch_embedding.bias", False,
            _vision_width, _same, _same_back),
    _family("img", "pos_embedding", VISION_PREFIX + "embeddings.position_embedding.weight", False,
            lambda d: (1, d.num_image_tokens, d.vision_width),
            lambda x, d: [x.reshape(-1, x.shape[-1])],
            lambda xs, d: xs[0].reshape(1, -1, d.vision_width)),
    _family("img", "LayerNorm_0/scale", _ENC + "layer_norm1.weight", True, _vision_width, _same, _same_back),
    _family("img", "LayerNorm_0/bias", _ENC + "layer_norm1.bias", True, _vision_width, _same, _same_back),
    _family("img", "LayerNorm_1/scale", _ENC + "layer_norm2.weight", True, _vision_width, _same, _same_back),
    _family("img", "LayerNorm_1/bias", _ENC + "layer_norm2.bias", True, _vision_width, _same, _same_back),
    *(
        _family("img", f"MultiHeadDotProductAttention_0/{name}/kernel", f"{_ENC}self_attn.{proj}_proj.weight",
                True,
                lambda d: (d.vision_width, d.vision_heads, _vision_head_dim(d)),
                lambda x, d: [x.reshape(x.shape[0], -1).T],  # (D, N, H) -> (N*H, D)
                _vision_qkv_back)
        for name, proj in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    *(
        _family("img", f"MultiHeadDotProductAttention_0/{name}/bias", _ENC + f"self_attn.{proj}_proj.bias",
                True,
                lambda d: (d.vision_heads, _vision_head_dim(d)),
                lambda x, d: [x.reshape(-1)],
                lambda xs, d: xs[0].reshape(d.vision_heads, _vision_head_dim(d)))
        for name, proj in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    _family("img", "MultiHeadDotProductAttention_0/out/kernel", _ENC + "self_attn.out_proj.weight", True,
            lambda d: (d.vision_heads, _vision_head_dim(d), d.vision_width),
            lambda x, d: [x.reshape(-1, x.shape[-1]).T],  # (N, H, D) -> (D, N*H)
            _vision_out_back),
    _family("img", "MultiHeadDotProductAttention_0/out/bias", _ENC + "self_attn.out_proj.bias", True,
            _vision_width, _same, _same_back),
    _family("img", "MlpBlock_0/Dense_0/kernel", _ENC + "mlp.fc1.weight", True,
            lambda d: (d.vision_width, d.vision_mlp_dim), _transpose, _transpose_back),
    _family("img", "MlpBlock_0/Dense_0/bias", _ENC + "mlp.fc1.bias", True,
            lambda d: (d.vision_mlp_dim,), _same, _same_back),
    _family("img", "MlpBlock_0/Dense_1/kernel", _ENC + "mlp.fc2.weight", True,
            lambda d: (d.vision_mlp_dim, d.vision_width), _transpose, _transpose_back),
    _family("img", "MlpBlock_0/Dense_1/bias", _ENC + "mlp.fc2.bias", True, _vision_width, _same, _same_back),
    _family("img", "Transformer/encoder_norm/scale", VISION_PREFIX + "post_layernorm.weight", False,
            _vision_width, _same, _same_back),
    _family("img", "Transformer/encoder_norm/bias", VISION_PREFIX + "post_layernorm.bias", False,
            _vision_width, _same, _same_back),
    # --- projector ---------------------------------------------------------------------------
    _family("img", "head/kernel", "model.multi_modal_projector.linear.weight", False,
            lambda d: (d.vision_width, d.width), _transpose, _transpose_back),
    _family("img", "head/bias", "model.multi_modal_projector.linear.bias", False, _width, _same, _same_back),
    # --- Gemma decoder -----------------------------------------------------------------------
    # HF rows beyond the text vocabulary (a padded HF embedding) are handled by the caller.
    _family("llm", "embedder/input_embedding", LANGUAGE_PREFIX + "embed_tokens.weight", False,
            lambda d: (d.vocab, d.width), _same, _same_back),
    _family("llm", "attn/q_einsum/w", _DEC + "self_attn.q_proj.weight", True,
            lambda d: (d.heads, d.width, d.head_dim),
            lambda x, d: [_q_to_hf(x, d)],
            lambda xs, d: _q_to_bv(xs[0], d.heads, d), kv="kv"),
    _family("llm", "attn/kv_einsum/w", (_DEC + "self_attn.k_proj.weight", _DEC + "self_attn.v_proj.weight"),
            True,
            lambda d: (2, d.kv_heads, d.width, d.head_dim),
            lambda x, d: [_q_to_hf(x[0], d), _q_to_hf(x[1], d)],
            lambda xs, d: torch.stack([_q_to_bv(w, d.kv_heads, d) for w in xs]), kv="kv"),
    _family("llm", "attn/qkv_einsum/w",
            tuple(f"{_DEC}self_attn.{p}_proj.weight" for p in "qkv"), True,
            lambda d: (3, d.heads, d.width, d.head_dim),
            lambda x, d: [_q_to_hf(x[c], d) for c in range(3)],
            lambda xs, d: torch.stack([_q_to_bv(w, d.heads, d) for w in xs]), kv="qkv"),
    _family("llm", "attn/attn_vec_einsum/w", _DEC + "self_attn.o_proj.weight", True,
            lambda d: (d.heads, d.head_dim, d.width),
            lambda x, d: [x.permute(2, 0, 1).reshape(x.shape[-1], -1)],  # (N, H, D) -> (D, N*H)
            lambda xs, d: xs[0].reshape(d.width, d.heads, d.head_dim).permute(1, 2, 0)),
    _family("llm", "mlp/gating_einsum", (_DEC + "mlp.gate_proj.weight", _DEC + "mlp.up_proj.weight"), True,
            lambda d: (2, d.width, d.mlp_dim),
            lambda x, d: [x[0].T, x[1].T],  # [0] goes through GELU (gate), [1] is the linear "up"
            lambda xs, d: torch.stack([xs[0].T, xs[1].T])),
    _family("llm", "mlp/linear", _DEC + "mlp.down_proj.weight", True,
            lambda d: (d.mlp_dim, d.width), _transpose, _transpose_back),
    _family("llm", "pre_attention_norm/scale", _DEC + "input_layernorm.weight", True,
            _width, _same, _same_back),
    # Gemma 1 has two norms per block; HF calls the second one post_attention_layernorm.
    _family("llm", "pre_ffw_norm/scale", _DEC + "post_attention_layernorm.weight", True,
            _width, _same, _same_back, versions=(1,)),
    _family("llm", "pre_ffw_norm/scale", _DEC + "pre_feedforward_layernorm.weight", True,
            _width, _same, _same_back, versions=(2,)),
    _family("llm", "post_attention_norm/scale", _DEC + "post_attention_layernorm.weight", True,
            _width, _same, _same_back, versions=(2,)),
    _family("llm", "post_ffw_norm/scale", _DEC + "post_feedforward_layernorm.weight", True,
            _width, _same, _same_back, versions=(2,)),
    _family("llm", "final_norm/scale", LANGUAGE_PREFIX + "norm.weight", False, _width, _same, _same_back),
)  # fmt: skip


def families(dims: Dims, qkv: bool) -> list[Family]:
    """The families present in a checkpoint of these dims (``qkv``: fused q/k/v einsum)."""
    want_kv = "qkv" if qkv else "kv"
    return [f for f in FAMILIES if dims.version in f.versions and f.kv in ("any", want_kv)]


def layer_group(tower: str, layer: int | None = None) -> str:
    """A tower's layer group: stacked (``layer`` None) or one unscanned layer, as big_vision names
    them (vit.py: ``encoderblock_{i}``; gemma.py with scan=False: ``layers/{i}``)."""
    if tower == "img":
        return "Transformer/encoderblock" if layer is None else f"Transformer/encoderblock_{layer}"
    return "layers" if layer is None else f"layers/{layer}"


def bv_key(family: Family, layer: int | None = None) -> str:
    """The big_vision key (without ``params/``) of a family; per-layer if ``layer`` is given."""
    if not family.per_layer:
        return f"{family.tower}/{family.bv}"
    return f"{family.tower}/{layer_group(family.tower, layer)}/{family.bv}"


# ---------------------------------------------------------------------------------------------
# Reading npz files member by member


def bfloat16_from_void(array: np.ndarray) -> Tensor:
    """big_vision's bf16 arrays are raw 2-byte voids (``|V2``); reinterpret them as bfloat16."""
    return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)


def to_numpy(tensor: Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array big_vision stores (bf16 as ``|V2``)."""
    tensor = tensor.detach().to("cpu")
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")
    return tensor.to(getattr(torch, dtype)).contiguous().numpy()


@dataclass
class _Member:
    name: str  # zip member name
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None  # byte offset of the raw data in the file (uncompressed members)


class NpzArrays:
    """Lazy, pickle-free reader of an ``.npz``: one array, or one layer of a stacked array, at a time.

    Uncompressed members (what ``np.savez`` writes) are read with positioned reads straight from
    the file, so the whole checkpoint is never resident and a single layer of a stacked array
    costs only that layer's bytes. Keys are exposed without the ``params/`` prefix.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"not a readable .npz file: {error}", path=self.path) from error
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        self.members: dict[str, _Member] = {}
        self.prefix = ""
        names = [n for n in self._zip.namelist() if n.endswith(".npy")]
        if names and all(n.startswith("params/") for n in names):
            self.prefix = "params/"
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            key = key[len(self.prefix) :] if self.prefix else key
            key = _ALT_LLM_LAYER.sub(r"llm/layers/\1/", key)  # layers_{i}/ → big_vision's layers/{i}/
            self.members[key] = self._parse(info)
        self._cache: tuple[str, np.ndarray] | None = None

    def _parse(self, info: zipfile.ZipInfo) -> _Member:
        with self._zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            header_len = f.tell()
        if dtype.hasobject:
            raise CheckpointError(
                f"array {info.filename} holds Python objects (pickle); refused", path=self.path
            )
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            # Local file header: 30 fixed bytes, then the name and the extra field.
            self._file.seek(info.header_offset)
            local = self._file.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + header_len
        return _Member(info.filename, tuple(shape), dtype, fortran, offset)

    def __enter__(self) -> NpzArrays:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._zip.close()
        self._cache = None

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def keys(self) -> list[str]:
        return list(self.members)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.members[key].shape

    def dtype_name(self, key: str) -> str:
        """``float32`` / ``float16`` / ``bfloat16`` (for ``|V2``) / numpy's name otherwise."""
        dtype = self.members[key].dtype
        if dtype.kind == "V" and dtype.itemsize == 2:
            return "bfloat16"
        return dtype.name

    def read(self, key: str, layer: int | None = None) -> Tensor:
        """The array ``key`` (or its ``layer``-th slice along axis 0) as a CPU tensor."""
        member = self.members.get(key)
        if member is None:
            raise CheckpointError(f"missing array {self.prefix}{key}", path=self.path)
        shape = member.shape if layer is None else member.shape[1:]
        if layer is not None and not (member.shape and 0 <= layer < member.shape[0]):
            raise CheckpointError(
                f"{self.prefix}{key} of shape {member.shape} has no layer {layer}", path=self.path
            )
        if member.offset is not None and not member.fortran:
            count = math.prod(shape)
            nbytes = count * member.dtype.itemsize
            start = member.offset + (0 if layer is None else layer * nbytes)
            buffer = read_buffer(nbytes)
            self._file.seek(start)
            if self._file.readinto(memoryview(buffer)[:nbytes]) != nbytes:
                raise CheckpointError(f"{self.prefix}{key}: file truncated", path=self.path)
            array = np.frombuffer(buffer, dtype=member.dtype, count=count).reshape(shape)
        else:  # compressed or Fortran-ordered: read the whole member once, keep it for its layers
            if self._cache is None or self._cache[0] != key:
                self._cache = None  # free the previous one before reading the next
                with self._zip.open(member.name) as f:
                    self._cache = (key, np.lib.format.read_array(f, allow_pickle=False))
            array = self._cache[1] if layer is None else self._cache[1][layer]
        return _to_tensor(array)


def read_buffer(nbytes: int) -> mmap.mmap:
    """A buffer to read ``nbytes`` of a checkpoint into: an anonymous mapping, not the heap, so
    it goes back to the OS the moment it is dropped (glibc keeps freed multi-MB heap chunks
    resident: a float32 → bfloat16 load peaked at 2× the model), in 2 MB pages where the kernel
    has them: one page fault per 2 MB instead of per 4 kB (the 3B model's 5.85 GB were read in
    8.2 s with 4 kB pages, 4.6 s with these, on this project's virtual machine)."""
    buffer = mmap.mmap(-1, max(nbytes, 1))
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= 1 << 21:
        with contextlib.suppress(OSError):
            buffer.madvise(advice)
    return buffer


def _to_tensor(array: np.ndarray) -> Tensor:
    if array.dtype.kind == "V":
        if array.dtype.itemsize != 2:
            raise CheckpointError(f"unsupported void dtype {array.dtype} (only bf16 as |V2)")
        return bfloat16_from_void(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


_ALT_LLM_LAYER = re.compile(r"^llm/layers_(\d+)/")
_LAYER_KEY = {
    "img": re.compile(r"^img/Transformer/encoderblock_(\d+)/"),
    "llm": re.compile(r"^llm/layers/(\d+)/"),
}
_DEPTH_KEY = {
    "img": "img/Transformer/encoderblock/LayerNorm_0/scale",
    "llm": "llm/layers/pre_attention_norm/scale",
}


def layer_layout(arrays: NpzArrays) -> dict[str, tuple[bool, int]]:
    """For each tower ("img", "llm"): (scanned, depth), from the keys present."""
    layout = {}
    for tower, pattern in _LAYER_KEY.items():
        found = {int(m.group(1)) for m in map(pattern.match, arrays.members) if m}
        if found:
            if found != set(range(len(found))):
                raise CheckpointError(
                    f"unscanned {tower} layers are not numbered 0..N-1 (found {sorted(found)[:8]}…)",
                    path=arrays.path,
                )
            layout[tower] = (False, len(found))
        elif _DEPTH_KEY[tower] in arrays:
            layout[tower] = (True, arrays.shape(_DEPTH_KEY[tower])[0])
        else:
            raise CheckpointError(
                f"not a PaliGemma big_vision checkpoint: no {arrays.prefix}{_DEPTH_KEY[tower]} "
                "(keys with or without params/ accepted, scanned or per layer)",
                path=arrays.path,
            )
    return layout


def infer_dims(arrays: NpzArrays) -> Dims:
    """Read every size from the shapes (nothing is assumed about 3B/224)."""
    layout = layer_layout(arrays)
    img_depth, llm_depth = layout["img"][1], layout["llm"][1]

    def shape(family_key: str, tower: str) -> tuple[int, ...]:
        if layout[tower][0]:
            key = f"{tower}/{layer_group(tower)}/{family_key}"
            return arrays.shape(key)[1:] if key in arrays else ()
        key = f"{tower}/{layer_group(tower, 0)}/{family_key}"
        return arrays.shape(key) if key in arrays else ()

    def need(key: str) -> tuple[int, ...]:
        if key not in arrays:
            raise CheckpointError(
                f"not a PaliGemma big_vision checkpoint: missing {arrays.prefix}{key}", path=arrays.path
            )
        return arrays.shape(key)

    patch, _, _, vision_width = need("img/embedding/kernel")
    tokens = need("img/pos_embedding")[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(
            f"img/pos_embedding has {tokens} positions, not a square grid", path=arrays.path
        )
    vocab, width = need("llm/embedder/input_embedding")
    q = shape("attn/q_einsum/w", "llm")
    qkv = shape("attn/qkv_einsum/w", "llm")
    kv = shape("attn/kv_einsum/w", "llm")
    if q and kv:
        heads, _, head_dim = q
        kv_heads = kv[1]
    elif qkv:
        heads, head_dim = qkv[1], qkv[3]
        kv_heads = heads
    else:
        raise CheckpointError(
            "no attention weights (q_einsum + kv_einsum, or qkv_einsum) under llm/layers", path=arrays.path
        )
    gating = shape("mlp/gating_einsum", "llm")
    vq = shape("MultiHeadDotProductAttention_0/query/kernel", "img")
    mlp = shape("MlpBlock_0/Dense_0/kernel", "img")
    if not (gating and vq and mlp):
        raise CheckpointError("missing MLP or vision attention weights", path=arrays.path)
    version = 2 if shape("post_attention_norm/scale", "llm") else 1
    return Dims(
        version=version,
        vocab=vocab,
        width=width,
        depth=llm_depth,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=gating[-1],
        vision_width=vision_width,
        vision_depth=img_depth,
        vision_heads=vq[1],
        vision_mlp_dim=mlp[-1],
        patch=patch,
        image_size=side * patch,
    )


def uses_qkv(arrays: NpzArrays) -> bool:
    return any(k.endswith("attn/qkv_einsum/w") for k in arrays.members)


def iter_layers(family: Family, dims: Dims) -> Iterator[int | None]:
    if not family.per_layer:
        yield None
        return
    yield from range(dims.vision_depth if family.tower == "img" else dims.depth)


def read_family(arrays: NpzArrays, family: Family, dims: Dims, layer: int | None, scanned: bool) -> Tensor:
    """One layer's (or a global family's) big_vision array, shape-checked."""
    if layer is None or not scanned:
        key = bv_key(family, layer)
        tensor = arrays.read(key)
    else:
        key = bv_key(family)
        tensor = arrays.read(key, layer)
    expected = family.shape(dims)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{arrays.prefix}{key}{'' if layer is None or not scanned else f'[{layer}]'} has shape "
            f"{tuple(tensor.shape)}, expected {expected} from the other arrays",
            path=arrays.path,
        )
    return tensor


# ---------------------------------------------------------------------------------------------
# Writing npz files member by member


class NpzWriter:
    """Streams arrays into an uncompressed ``.npz`` one member (or one layer) at a time.

    ``np.savez`` needs every array in memory at once; this writer never holds more than the
    layer it is writing. The result is a plain npz (``np.load`` reads it).
    """

    def __init__(self, path: str | Path, prefix: str = "params/"):
        self.path = Path(path)
        self.prefix = prefix
        try:
            self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        except OSError as error:
            raise CheckpointError(f"cannot write: {error}", path=self.path) from error

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()

    def write(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{self.prefix}{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def write_layers(self, key: str, count: int, layers: Iterator[np.ndarray]) -> None:
        """Write ``count`` same-shaped arrays as one stacked (scanned) array, layer by layer."""
        with self._zip.open(f"{self.prefix}{key}.npy", "w", force_zip64=True) as f:
            first = None
            for i, layer in enumerate(layers):
                if first is None:
                    first = layer
                    header = {
                        "descr": np.lib.format.dtype_to_descr(layer.dtype),
                        "fortran_order": False,
                        "shape": (count, *layer.shape),
                    }
                    # A few dozen bytes: the 1.0 header format (2-byte length) always suffices.
                    np.lib.format.write_array_header_1_0(f, header)
                elif layer.shape != first.shape or layer.dtype != first.dtype:
                    raise ValueError(
                        f"{key}: layer {i} is {layer.dtype}{layer.shape}, not {first.dtype}{first.shape}"
                    )
                f.write(np.ascontiguousarray(layer).tobytes())
                if i + 1 > count:
                    raise ValueError(f"{key}: more than {count} layers")
