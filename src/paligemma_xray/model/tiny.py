"""Tiny PaliGemma models, tokenizer and checkpoint files for tests and the demo.

Nothing is downloaded: the tokenizer is a SentencePiece model trained in memory on a few
hundred words of radiology and shape vocabulary, with the 1024 ``<locNNNN>`` and 128
``<segNNN>`` pieces appended at the end of its proto as in the real one. The default configs
have heads × head_dim ≠ width and kv_heads < heads, which catches the classic reshape bugs.

Example:

>>> import tempfile, pathlib
>>> model, processor = tiny_model(version=2, seed=0)
>>> model.config.text_config.model_type
'gemma2'
>>> npz, spm = write_tiny_npz(pathlib.Path(tempfile.mkdtemp()) / "tiny.npz", version=1, dtype="bfloat16")
>>> npz.name, spm.name
('tiny.npz', 'paligemma_tokenizer.model')
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import random
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from paligemma_xray.model.bigvision import (
    Dims,
    NpzWriter,
    bv_key,
    families,
    iter_layers,
    make_config,
    sub_configs,
    to_numpy,
)
from paligemma_xray.model.forms import HF_TOKENIZER, NPZ_TOKENIZER
from paligemma_xray.model.processing import make_processor
from paligemma_xray.model.tokenizer import LOC_TOKENS, SEG_TOKENS, load_tokenizer

_VOCABULARY = """
fracture fractures fractured bone bones xray x-ray radiograph radiographs radiology radiologist
image images view views frontal lateral oblique anteroposterior posteroanterior projection film
radius ulna femur tibia fibula humerus clavicle scapula pelvis patella scaphoid lunate
metacarpal metatarsal phalanx phalanges calcaneus talus vertebra vertebrae rib ribs skull
mandible sternum wrist elbow ankle knee hip shoulder hand foot finger toe spine neck forearm
leg arm thigh displaced nondisplaced comminuted transverse spiral greenstick avulsion hairline
stress buckle torus impacted compression segmental pathologic open closed healing healed callus
union malunion nonunion dislocation subluxation effusion swelling soft tissue joint cortex
cortical medullary trabecular periosteal reaction lucency sclerosis fragment fragments
angulation alignment normal abnormal acute chronic old new mild moderate severe small large
subtle obvious proximal distal shaft head base tip body neck condyle epicondyle malleolus
styloid plateau anterior posterior medial lateral superior inferior left right both bilateral
detect segment caption describe answer question what where which is are the a an of in on at
with without no yes there this that finding findings impression patient child adult follow up
circle square triangle rectangle ellipse star cross ring box shape shapes line lines dot dots
red green blue yellow white black gray grey bright dark light large small big tiny one two
three four five six seven eight nine ten first second third
"""
_WORDS = _VOCABULARY.split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]


def _spm_proto() -> ModuleType:
    """sentencepiece's protobuf module; its message classes are made when it is imported,
    which a type checker cannot see, so they are looked up on the module object."""
    return importlib.import_module("sentencepiece.sentencepiece_model_pb2")


@functools.lru_cache(maxsize=4)
def _spm_bytes(base_vocab: int = 640) -> bytes:
    """Serialized SentencePiece model: Gemma-like specials, then BPE pieces, then loc/seg."""
    import sentencepiece as spm

    model_pb2 = _spm_proto()

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buffer,
        vocab_size=base_vocab,
        model_type="bpe",  # Gemma's tokenizer is BPE with byte fallback
        byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "\n"],  # "\n" is one piece in Gemma (it ends every prompt)
        split_digits=True,
        add_dummy_prefix=False,  # Gemma adds no leading "▁"
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    if len(proto.pieces) != base_vocab:
        raise RuntimeError(f"tiny tokenizer trained to {len(proto.pieces)} pieces, wanted {base_vocab}")
    # Appended at the END, so their ids follow the base vocabulary as in paligemma_tokenizer.model.
    for piece in LOC_TOKENS + SEG_TOKENS:
        proto.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


TINY_BASE_VOCAB = 640
#: Text vocabulary of the tiny tokenizer (base pieces + 1024 loc + 128 seg); ``<image>`` is this id.
TINY_VOCAB_SIZE = TINY_BASE_VOCAB + len(LOC_TOKENS) + len(SEG_TOKENS)


#: The real ``paligemma_tokenizer.model``'s layout: 256,000 Gemma pieces, loc at 256000, seg at 257024.
REAL_BASE_VOCAB = 256_000
REAL_VOCAB_SIZE = REAL_BASE_VOCAB + len(LOC_TOKENS) + len(SEG_TOKENS)  # 257,152; <image> = 257152


@functools.lru_cache(maxsize=1)
def _real_layout_spm_bytes() -> bytes:
    """The tiny trained BPE model padded with unused pieces to 256,000, then loc/seg (257,152).

    Size thresholds in dependencies split tiny tests from real use (transformers 5.x treats
    a vocabulary over 100,000 pieces differently), so the suite needs a file of the real
    size. Training 256,000 pieces would take minutes; appending unreachable pieces to the
    trained proto takes about a second. The padding pieces are ``NORMAL`` pieces that no
    merge can form (``<unusedN>``: no split of one is two pieces), so text tokenizes as with
    the tiny model, but every id, and the size, is the real one's.
    """
    model_pb2 = _spm_proto()

    proto = model_pb2.ModelProto()
    proto.ParseFromString(_spm_bytes(TINY_BASE_VOCAB))
    del proto.pieces[TINY_BASE_VOCAB:]  # the tiny loc/seg pieces; appended again after the padding
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    for i in range(TINY_BASE_VOCAB, REAL_BASE_VOCAB):
        proto.pieces.add(piece=f"<unused{i}>", score=float(-i), type=normal)
    for piece in LOC_TOKENS + SEG_TOKENS:
        proto.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.trainer_spec.vocab_size = REAL_BASE_VOCAB
    return proto.SerializeToString()


def real_layout_tokenizer(path: str | Path) -> Path:
    """Write a SentencePiece model with ``paligemma_tokenizer.model``'s layout to ``path``.

    257,152 pieces: pad 0, eos 1, bos 2, unk 3, the tiny trained BPE pieces up to 639,
    unused pieces up to 255999, ``<loc0000>``.. at 256000 and ``<seg000>``.. at 257024
    (a file, or a folder → ``tokenizer.model``; about 6 MB).
    """
    path = Path(path)
    if path.is_dir():
        path = path / HF_TOKENIZER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_real_layout_spm_bytes())
    return path


def _spm_for(vocab_size: int) -> bytes:
    """The real-layout SentencePiece bytes for ``REAL_VOCAB_SIZE``, else the tiny one's (a test
    may pair a checkpoint with a tokenizer of another size on purpose)."""
    if vocab_size == REAL_VOCAB_SIZE:
        return _real_layout_spm_bytes()
    return _spm_bytes(TINY_BASE_VOCAB)


def tiny_tokenizer(path: str | Path) -> Path:
    """Write the tiny SentencePiece model to ``path`` (a file, or a folder → ``tokenizer.model``).

    Pieces: pad 0, eos 1, bos 2, unk 3, then ``<mask>``, ``"\\n"``, 256 byte-fallback pieces,
    BPE pieces (640 in all), then ``<loc0000>``.. (640..1663) and ``<seg000>``.. (1664..1791).
    """
    path = Path(path)
    if path.is_dir():
        path = path / HF_TOKENIZER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_spm_bytes(TINY_BASE_VOCAB))
    return path


def _cached_tokenizer_path(vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """The tiny (or real-layout) tokenizer in a per-content temp file, so processors can point
    at a real file."""
    data = _spm_for(vocab_size)
    folder = Path(tempfile.gettempdir()) / "paligemma_xray_tiny"
    path = folder / f"tokenizer-{hashlib.sha256(data).hexdigest()[:16]}.model"
    if not path.exists():
        from paligemma_xray import atomic

        atomic.write_bytes(path, data)  # parallel test workers never see a half-written file
    return path


def tiny_dims(
    version: int = 1,
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    image_size: int = 28,
    patch_size: int = 14,
    width: int = 48,
    depth: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 16,
    mlp_dim: int = 96,
    vision_width: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_mlp_dim: int = 64,
) -> Dims:
    """Sizes of a tiny model; defaults: heads×head_dim = 64 ≠ width 48, kv_heads 1 (v1) / 2 (v2)."""
    if version not in (1, 2):
        raise ValueError(f"PaliGemma version must be 1 or 2, not {version}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if vision_width % vision_heads:
        raise ValueError(f"vision_width {vision_width} is not a multiple of vision_heads {vision_heads}")
    if kv_heads is None:
        kv_heads = 1 if version == 1 else min(2, heads)
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    return Dims(
        version=version, vocab=vocab_size, width=width, depth=depth, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, mlp_dim=mlp_dim, vision_width=vision_width, vision_depth=vision_depth,
        vision_heads=vision_heads, vision_mlp_dim=vision_mlp_dim, patch=patch_size, image_size=image_size,
    )  # fmt: skip


def tiny_config(
    version: int = 1, *, final_logit_softcapping: float | None = 30.0, **sizes
) -> PaliGemmaConfig:
    """A PaliGemma 1 (Gemma) or 2 (Gemma 2) config small enough for CPU tests.

    ``sizes`` are :func:`tiny_dims`' keywords (width, depth, heads, kv_heads, head_dim, mlp_dim,
    vision_*, image_size, patch_size, vocab_size). The config follows exactly the conventions
    the big_vision converter uses (:func:`paligemma_xray.model.bigvision.make_config`).

    >>> tiny_config(2, width=64, depth=3, image_size=56).text_config.num_hidden_layers
    3
    """
    return make_config(tiny_dims(version, **sizes), final_logit_softcapping=final_logit_softcapping)


def tiny_model(
    version: int = 1, seed: int = 0, **config_kwargs
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A randomly initialised tiny model (eval mode, float32) and its processor.

    ``vocab_size=REAL_VOCAB_SIZE`` gives tiny widths with the real vocabulary and tokenizer.
    """
    config = tiny_config(version, **config_kwargs)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    text, vision = sub_configs(config)
    tokenizer = load_tokenizer(_cached_tokenizer_path(text.vocab_size))
    if len(tokenizer) - 1 != text.vocab_size:
        raise ValueError(
            f"vocab_size {text.vocab_size} does not match the tiny tokenizer ({len(tokenizer) - 1})"
        )
    processor = make_processor(tokenizer, vision.image_size, vision.patch_size)
    return model, processor


def random_bigvision_arrays(dims: Dims, *, seed: int = 0, qkv: bool = False):
    """Yield (family, [per-layer float32 arrays] or array) of a random big_vision checkpoint.

    Scales keep activations O(1): kernels ~ N(0, 1/fan-in), norm scales around their neutral
    value (0 for Gemma's (1 + scale) RMSNorm, 1 for LayerNorm) with noise so that a wrong
    norm mapping shows.
    """
    rng = np.random.default_rng(seed)

    def sample(family, shape):
        name = family.bv
        if name.endswith("scale"):
            base = 1.0 if family.tower == "img" else 0.0
            return (base + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith("bias"):
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name == "embedder/input_embedding":
            return rng.standard_normal(shape).astype(np.float32) / np.sqrt(dims.width)
        if name == "pos_embedding":
            return (0.5 * rng.standard_normal(shape)).astype(np.float32)
        fan_in = {
            "embedding/kernel": dims.patch * dims.patch * 3,
            "attn/attn_vec_einsum/w": dims.heads * dims.head_dim,
            "mlp/linear": dims.mlp_dim,
            "MlpBlock_0/Dense_1/kernel": dims.vision_mlp_dim,
            "MultiHeadDotProductAttention_0/out/kernel": dims.vision_width,
        }.get(name, dims.vision_width if family.tower == "img" else dims.width)
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    for family in families(dims, qkv):
        shape = family.shape(dims)
        if family.per_layer:
            yield family, [sample(family, shape) for _ in iter_layers(family, dims)]
        else:
            yield family, sample(family, shape)


def write_tiny_npz(
    path: str | Path,
    version: int = 1,
    dtype: str = "float32",
    *,
    seed: int = 0,
    scanned: bool = True,
    prefix: str = "params/",
    qkv: bool = False,
    **sizes,
) -> tuple[Path, Path]:
    """Write a random big_vision checkpoint and its tokenizer; return (npz, tokenizer) paths.

    Written straight in big_vision's layout (not through our own ``save_npz``), so loading it
    tests the reader independently. ``dtype``: float32, float16 or bfloat16 (stored as
    ``|V2``). ``vocab_size=REAL_VOCAB_SIZE`` uses the real tokenizer's layout
    (:func:`real_layout_tokenizer`). ``scanned=False`` writes ``encoderblock_{i}``/``layers/{i}``
    keys; ``qkv=True`` a fused ``qkv_einsum`` (sets kv_heads = heads); ``prefix`` "" drops ``params/``. The
    tokenizer is written beside it as ``paligemma_tokenizer.model``.
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
    if qkv:
        sizes["kv_heads"] = sizes.get("heads", 4)
    dims = tiny_dims(version, **sizes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with NpzWriter(path, prefix=prefix) as writer:
        for family, value in random_bigvision_arrays(dims, seed=seed, qkv=qkv):
            if not family.per_layer:
                writer.write(bv_key(family), to_numpy(torch.from_numpy(value), dtype))
            elif scanned:
                writer.write_layers(
                    bv_key(family), len(value), (to_numpy(torch.from_numpy(v), dtype) for v in value)
                )
            else:
                for i, v in enumerate(value):
                    writer.write(bv_key(family, i), to_numpy(torch.from_numpy(v), dtype))
    spm = path.parent / NPZ_TOKENIZER
    spm.write_bytes(_spm_for(dims.vocab))
    return path, spm


def write_tiny_hf(path: str | Path, version: int = 1, seed: int = 0, **config_kwargs) -> Path:
    """Save a tiny random model + processor as an HF folder (``save_pretrained``); return it."""
    from paligemma_xray.model.saving import save_hf

    model, processor = tiny_model(version, seed, **config_kwargs)
    return save_hf(model, processor, path)


def write_hub_cache(
    hf_home: str | Path,
    repo_id: str,
    folder: str | Path,
    *,
    revision: str = "main",
    commit: str | None = None,
) -> Path:
    """Put ``folder``'s files into a Hugging Face Hub cache as if downloaded; return the snapshot.

    The layout huggingface_hub writes: ``HF_HOME/hub/models--ORG--NAME/blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` (relative links to the blobs) and ``refs/<revision>``
    holding the commit. ``commit`` defaults to a hash of the files, so different contents
    get different snapshots. With ``HF_HOME`` pointing here and ``HF_HUB_OFFLINE=1``,
    ``repo_id`` loads with no network, through the library's own cache lookup.
    """
    import os
    import shutil

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + file.read_bytes())
    commit = commit or digest.hexdigest()
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in files:
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def write_kaggle_cache(cache: str | Path, handle: str, files: dict[str, str | Path]) -> Path:
    """Put ``files`` (name in the download → source file) into a kagglehub cache; return the folder.

    ``handle``: ``OWNER/MODEL/FRAMEWORK/VARIATION/VERSION``. The layout kagglehub writes:
    ``KAGGLEHUB_CACHE/models/OWNER/MODEL/FRAMEWORK/VARIATION/VERSION/…`` and the completion
    marker ``…/VARIATION/VERSION.complete`` beside it.
    """
    import shutil

    owner, model, framework, variation, version = handle.split("/")
    base = Path(cache) / "models" / owner / model / framework / variation
    out = base / str(int(version))
    for name, source in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / name)
    (base / f"{int(version)}.complete").touch()
    return out
