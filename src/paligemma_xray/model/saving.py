"""Save PaliGemma checkpoints: HF folders, big_vision ``.npz`` files, PEFT LoRA adapters.

Example:

>>> import tempfile, pathlib
>>> from paligemma_xray.model import load
>>> from paligemma_xray.model.tiny import write_tiny_npz
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> npz, _ = write_tiny_npz(folder / "tiny.npz", version=2, dtype="bfloat16")
>>> model, processor = load(npz, progress=False)
>>> save_npz(model, folder / "back.npz", dtype="bfloat16", progress=False)   # bit-exact round trip
PosixPath('...back.npz')
>>> hf = save_hf(model, processor, folder / "hf", progress=False)               # plain transformers folder
>>> model, processor = load(hf, dtype="float32", progress=False)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from paligemma_xray import atomic
from paligemma_xray.atomic import write_json
from paligemma_xray.errors import CheckpointError, check_output
from paligemma_xray.model.bigvision import (
    Dims,
    Family,
    NpzWriter,
    bv_key,
    dims_from_config,
    families,
    iter_layers,
    to_numpy,
)
from paligemma_xray.model.forms import CONFIG, HF_TOKENIZER
from paligemma_xray.model.loading import DTYPES, EMBEDDING, transformers_progress
from paligemma_xray.progress import bar as progress_bar


def save_hf(
    model: PaliGemmaForConditionalGeneration,
    processor: PaliGemmaProcessor,
    out_dir: str | Path,
    *,
    progress: bool = True,
    staged: bool = True,
) -> Path:
    """``save_pretrained`` both (safetensors), plus the SentencePiece ``tokenizer.model`` when known.

    The folder loads in plain transformers (``PaliGemmaForConditionalGeneration.from_pretrained``
    and ``AutoProcessor.from_pretrained``) and in :func:`load`. ``staged`` (default): written
    whole into a temporary sibling and renamed when complete, so a full disk never leaves a
    folder holding only config files under the final name; ``staged=False`` writes into
    ``out_dir`` as it is, for a caller that stages the whole folder itself (a run's ``last/``,
    which also holds the LoRA adapter).
    """
    out = check_output(out_dir, folder=True)
    if hasattr(model, "merge_and_unload"):
        raise TypeError("save_hf takes a plain model: merge the LoRA adapter first, or use save_lora")
    if not staged:
        out.mkdir(parents=True, exist_ok=True)
        _write_hf(model, processor, out, progress)
        return out
    with atomic.staged_dir(out) as tmp:
        _write_hf(model, processor, tmp, progress)
    return out


def _write_hf(
    model: PaliGemmaForConditionalGeneration, processor: PaliGemmaProcessor, folder: Path, progress: bool
) -> None:
    with transformers_progress(progress):
        model.save_pretrained(folder, safe_serialization=True)
    floating = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if len(floating) > 1 and torch.float32 in floating:
        # Frozen weights in the base's 16-bit dtype, trained ones in float32: transformers
        # records the first parameter's dtype, and loading "auto" would round the trained
        # weights to it. float32 reproduces every stored weight exactly.
        config = json.loads((folder / CONFIG).read_text())
        write_json(folder / CONFIG, {**config, "dtype": "float32"})
    processor.save_pretrained(folder)
    spm = getattr(processor.tokenizer, "spm_path", None)
    if spm and Path(spm).is_file() and Path(spm).resolve() != (folder / HF_TOKENIZER).resolve():
        shutil.copyfile(spm, folder / HF_TOKENIZER)
    _usual_modes(folder)


def _usual_modes(folder: Path) -> None:
    """Files as the umask makes them (safetensors writes its file 0600, the rest are 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)


def save_npz(
    model: PaliGemmaForConditionalGeneration,
    path: str | Path,
    dtype: str = "float32",
    *,
    prefix: str = "params/",
    scanned: bool = True,
    vocab: int | None = None,
    progress: bool = True,
) -> Path:
    """Write big_vision's ``.npz``: its keys, shapes and dtype (bf16 as ``|V2``), layer by layer.

    Embedding rows are cut back to the text vocabulary (``vocab``, default: the rows below
    ``<image>``, 257152 for the real model). ``qkv_einsum`` is written only when kv_heads ==
    heads, as big_vision does. ``scanned=False`` writes big_vision's unscanned keys
    (``img/Transformer/encoderblock_{i}/…``, ``llm/layers/{i}/…``).
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if hasattr(model, "merge_and_unload"):
        raise TypeError("save_npz takes a plain model: merge the LoRA adapter first")
    dims = dims_from_config(model.config, vocab)
    state = model.state_dict()  # references to the live tensors, no copy
    return write_npz_streamed(lambda name: state[name], dims, path, dtype, prefix, scanned, progress)


def write_npz_streamed(
    get: Callable[[str], torch.Tensor],
    dims: Dims,
    path: str | Path,
    dtype: str,
    prefix: str,
    scanned: bool,
    progress: bool,
) -> Path:
    """big_vision's npz from ``get(hf_name) -> tensor``, one array (or layer) in memory at a time.

    ``get`` may read from a model's state dict (:func:`save_npz`) or straight from safetensors
    files (``convert``'s HF folder → npz, which never builds the model).
    """
    qkv = dims.kv_heads == dims.heads
    path = check_output(path, folder=False)
    fams = families(dims, qkv)
    total = sum(len(list(iter_layers(f, dims))) for f in fams)

    def bv_array(family: Family, layer: int | None) -> np.ndarray:
        tensors = [get(name.format(i=layer)).detach().to("cpu") for name in family.hf]
        if family.hf[0] == EMBEDDING:
            tensors = [tensors[0][: dims.vocab]]
        array = family.to_bv(tensors, dims)
        if tuple(array.shape) != family.shape(dims):
            raise RuntimeError(f"{family.bv}: got {tuple(array.shape)}, expected {family.shape(dims)}")
        bar.update(1)
        return to_numpy(array, dtype)

    with (
        atomic.staged_path(path) as tmp,
        NpzWriter(tmp, prefix=prefix) as writer,
        progress_bar(total=total, desc=f"writing {path.name}", unit="array", enabled=progress) as bar,
    ):
        for family in fams:
            if not family.per_layer:
                writer.write(bv_key(family), bv_array(family, None))
            elif scanned:
                layers = list(iter_layers(family, dims))
                writer.write_layers(bv_key(family), len(layers), (bv_array(family, i) for i in layers))
            else:
                for i in iter_layers(family, dims):
                    writer.write(bv_key(family, i), bv_array(family, i))
    return path


def save_lora(
    peft_model: Any,
    out_dir: str | Path,
    base: str | Path | None = None,
    revision: str | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Save a ``PeftModel``'s adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``base``: the checkpoint the adapter applies to, recorded in ``adapter_config.json`` so
    that :func:`load` can find it (a path relative to ``out_dir`` or absolute, or a Hub id
    with its ``revision``, PEFT's own field for the base model's revision). ``state_dict``:
    the adapter's weights by the model's parameter names, when the live ones cannot be read
    (FSDP shards); default: the model's own.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError("save_lora needs a peft.PeftModel")
    out = Path(out_dir)
    if base is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(base)
            config.revision = revision
    peft_model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    return out
