"""The ``convert`` verb: any checkpoint ``load`` reads into an HF folder or a big_vision ``.npz``."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray import atomic
from paligemma_xray.errors import CheckpointError, check_output
from paligemma_xray.model.bigvision import dims_from_config
from paligemma_xray.model.forms import (
    CONFIG,
    HF_TOKENIZER,
    HF_WEIGHTS,
    HF_WEIGHTS_INDEX,
    NPZ_TOKENIZER,
    identify,
)
from paligemma_xray.model.loading import DTYPES, load, stored_dtype
from paligemma_xray.model.saving import save_hf, save_npz, write_npz_streamed


def convert(
    src: str | Path,
    out: str | Path,
    *,
    to: str | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    progress: bool = True,
    revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert any checkpoint :func:`load` reads into an HF folder (``to="hf"``) or a big_vision npz.

    An existing ``out`` is refused unless ``overwrite``; the output appears only once complete.

    ``to`` defaults to ``npz`` when ``out`` ends in ``.npz``, else ``hf``. ``dtype`` defaults to
    the source's. LoRA adapters are merged first. ``src`` may be a Hub id or a ``kaggle:``
    handle (``revision``: see :func:`load`). An npz output gets the SentencePiece file
    beside it (``paligemma_tokenizer.model``) when it is known, so the pair loads back as is.

    Example (a tiny random checkpoint; ``paligemma-3b-pt-224.f16.npz`` converts alike):

    >>> import pathlib, tempfile
    >>> from paligemma_xray.model.tiny import write_tiny_npz
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> npz, _ = write_tiny_npz(folder / "tiny.npz")
    >>> convert(npz, folder / "hf", progress=False).name                                # → HF folder
    'hf'
    >>> convert(folder / "hf", folder / "back.npz", dtype="bfloat16", progress=False).name  # → npz
    'back.npz'
    """
    out = Path(out)
    to = to or ("npz" if out.suffix == ".npz" else "hf")
    if to not in ("hf", "npz"):
        raise CheckpointError(f"unknown target format {to!r}; use hf or npz")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    try:
        same = Path(src).resolve() == out.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
        raise CheckpointError(f"cannot resolve the path: {error}", path=src) from None
    if same:
        raise CheckpointError("output would overwrite the input", path=out)
    check_output(out, folder=to == "hf")  # before the (long) load
    atomic.check_fresh(out, overwrite=overwrite, what="output")
    folder = None  # an HF folder (or a run's full last/) streams to npz without building the model
    if Path(src).exists():  # (a name that is not on disk: load says what it is)
        form = identify(src)
        folder = form.weights if form.weights_form == "hf" else None
    # Loaded straight in the output's dtype: one copy of the model in memory, not a float32
    # one and then a 16-bit one (a run of a float16 base holds float32 trained weights).
    stored = dtype or stored_dtype(src, revision)
    if to == "npz" and folder is not None and tokenizer is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = _hf_to_npz(folder, out, stored, progress)
        beside = out.parent / NPZ_TOKENIZER
        if (folder / HF_TOKENIZER).is_file() and not beside.exists():
            with atomic.staged_path(beside) as tmp:
                shutil.copyfile(folder / HF_TOKENIZER, tmp)
        return path
    model, processor = load(src, tokenizer=tokenizer, dtype=stored, progress=progress, revision=revision)
    if to == "hf":
        return save_hf(model, processor, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_npz(model, out, dtype=stored, progress=progress)
    spm = getattr(processor.tokenizer, "spm_path", None)
    beside = out.parent / NPZ_TOKENIZER
    if spm and Path(spm).is_file() and not beside.exists():
        with atomic.staged_path(beside) as tmp:
            shutil.copyfile(spm, tmp)
    return path


def _hf_to_npz(folder: Path, out: Path, dtype: str, progress: bool) -> Path:
    """Stream an HF folder's safetensors into big_vision's npz without building the model.

    ``from_pretrained`` + ``save_npz`` holds the loaded model and the memory-mapped file at
    once (measured: 17.6 GB for an 11 GB float32 folder written as float16); read tensor by
    tensor, the peak is about the input file's size. Names in the file are transformers'
    saved ("original") ones: mapped back with its own ``revert_weight_conversion``.
    """
    from safetensors import safe_open
    from transformers import PaliGemmaConfig
    from transformers.core_model_loading import revert_weight_conversion

    try:
        config = PaliGemmaConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {CONFIG}: {error}", path=folder) from error
    with torch.device("meta"):
        skeleton = PaliGemmaForConditionalGeneration(config)
    markers = {name: torch.empty(0) for name in skeleton.state_dict()}
    reverted = revert_weight_conversion(skeleton, dict(markers))
    owner = {id(tensor): name for name, tensor in markers.items()}
    saved_name = {owner[id(tensor)]: saved for saved, tensor in reverted.items()}
    index = folder / HF_WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / HF_WEIGHTS), framework="pt") as weights:
            weight_map = dict.fromkeys(weights.keys(), HF_WEIGHTS)
    handles: dict[str, Any] = {}

    def get(name: str) -> torch.Tensor:
        key = saved_name.get(name, name)
        key = key if key in weight_map else name
        if key not in weight_map:
            raise CheckpointError(f"no tensor {key} in the folder's safetensors", path=folder)
        file = weight_map[key]
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(str(folder / file), framework="pt"))
        return handles[file].get_tensor(key)

    with contextlib.ExitStack() as stack:
        return write_npz_streamed(get, dims_from_config(config), out, dtype, "params/", True, progress)
