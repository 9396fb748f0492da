"""Load PaliGemma checkpoints of every form :func:`~paligemma_xray.model.forms.identify` knows.

Example:

>>> import tempfile, pathlib
>>> from paligemma_xray.model.tiny import write_tiny_npz
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> npz, _ = write_tiny_npz(folder / "tiny.npz", version=2, dtype="bfloat16")
>>> model, processor = load(npz, progress=False)        # tokenizer found beside the npz
>>> model.dtype
torch.bfloat16
>>> stored_dtype(npz)
'bfloat16'
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from paligemma_xray.errors import CheckpointError, ConfigError
from paligemma_xray.model.bigvision import (
    NpzArrays,
    bv_key,
    families,
    infer_dims,
    iter_layers,
    layer_layout,
    make_config,
    read_buffer,
    read_family,
    sub_configs,
    uses_qkv,
)
from paligemma_xray.model.forms import (
    HF_TOKENIZER,
    HF_WEIGHTS,
    HF_WEIGHTS_INDEX,
    TOKENIZER_NAMES,
    TRAINED_WEIGHTS,
    CheckpointForm,
    identify,
    is_model_name,
)
from paligemma_xray.model.head import ExactRows, decisive_token_ids, head_weight, keep_rows, remember
from paligemma_xray.model.hub import check_paligemma_folder, resolve_checkpoint
from paligemma_xray.model.processing import make_processor
from paligemma_xray.model.tokenizer import load_tokenizer, sentencepiece_size
from paligemma_xray.progress import bar as progress_bar

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDING = "model.language_model.embed_tokens.weight"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``torch.bfloat16``/``None`` → a torch dtype (``None``: keep the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``--device`` checked before any weights are read: a name torch knows, and there.

    Raises :class:`ConfigError` for an unknown name (``--device foo``), CUDA asked for on a
    build or machine without it, or a GPU index past the last one. ``None`` passes.
    """
    if device is None:
        return None
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {str(device)!r} asked for, but {build}; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but MPS is not available; use --device cpu")
    elif chosen.type not in ("cpu", "cuda", "mps", "meta"):
        raise ConfigError(f"unsupported device {str(device)!r}: use cpu, cuda, cuda:N or mps")
    return chosen


# ---------------------------------------------------------------------------------------------
# load


def load(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    merge_lora: bool = True,
    final_logit_softcapping: float | None = 30.0,
    progress: bool = True,
    revision: str | None = None,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Load a model and its processor from any checkpoint form we know.

    ``path``: a big_vision ``.npz`` (PaliGemma 1 or 2, f32/f16/bf16, any size/resolution), an
    HF ``save_pretrained`` folder, a PEFT LoRA adapter folder (its base is loaded first, from
    ``base_model_name_or_path``; merged unless ``merge_lora=False``, which returns the
    ``PeftModel``), or a run folder of ours (``best/``, else ``last/``). ``path`` may also
    name a model: a Hugging Face Hub id (``google/paligemma2-3b-pt-224``; ``revision``: a
    branch, tag or commit) or a Kaggle handle (``kaggle:google/paligemma/jax/paligemma-3b-pt-224``;
    ``revision``: a version), fetched through :mod:`paligemma_xray.model.hub` (a local path
    of the same spelling wins).

    ``tokenizer``: the SentencePiece ``.model``; for an npz it defaults to
    ``paligemma_tokenizer.model`` or ``tokenizer.model`` beside it. ``dtype``: ``None`` keeps
    the stored dtype; 16-bit casts keep the rotary ``inv_freq`` buffers in float32.
    ``final_logit_softcapping`` applies to PaliGemma 2 npz files only (see ``bigvision``).
    The model is returned in eval mode.
    """
    target = resolve_dtype(dtype)
    check_device(device)  # before a download or a load
    path, found_tokenizer = resolve_checkpoint(
        path, revision, dtype=str(target).removeprefix("torch.") if target else None, progress=progress
    )
    form = identify(path)  # says what a wrong file is, before any weights are read
    tokenizer = next((t for t in (tokenizer, found_tokenizer, form.tokenizer) if t is not None), None)
    if form.weights_form == "npz":
        model, processor = _load_npz(form.weights, tokenizer, target, final_logit_softcapping, progress)
    elif form.weights_form == "trained":
        model, processor = _load_trained_folder(form, tokenizer, target, progress)
    elif form.weights_form == "adapter":
        with transformers_progress(progress):
            return _load_lora_folder(form, tokenizer, target, device, merge_lora)
    else:
        check_paligemma_folder(form.weights)
        with transformers_progress(progress):
            model, processor = _load_hf(form.weights, tokenizer, target)
    if device is not None:
        # transformers' decorated ``to`` is typed as taking the model again; it takes a device.
        model.to(device)  # type: ignore[arg-type]
    return model.eval(), processor


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Inside: transformers' own progress bars (loading, writing shards) on or off, as ours.

    transformers switches them globally; the previous state is restored on the way out.
    """
    from transformers.utils import logging as hf_logging

    from paligemma_xray.progress import is_enabled, is_terminal

    was_enabled = hf_logging.is_progress_bar_enabled()
    if is_enabled(enabled) and is_terminal():  # their bars redraw in place: only on a terminal
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _find_tokenizer(npz: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    raise CheckpointError(
        f"no tokenizer given and none beside the checkpoint ({' or '.join(TOKENIZER_NAMES)}); "
        "pass the SentencePiece .model file (--tokenizer)",
        path=npz,
    )


def _load_npz(
    path: Path,
    tokenizer: str | Path | None,
    target: torch.dtype | None,
    final_logit_softcapping: float | None,
    progress: bool,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    spm = _find_tokenizer(path, tokenizer)
    tok = load_tokenizer(spm)
    with NpzArrays(path) as arrays:
        dims = infer_dims(arrays)
        layout = layer_layout(arrays)
        qkv = uses_qkv(arrays)
        if sentencepiece_size(tok) != dims.vocab:
            raise CheckpointError(
                f"tokenizer {spm} has {sentencepiece_size(tok)} pieces but llm/embedder/input_embedding "
                f"has {dims.vocab} rows",
                path=path,
            )
        stored = arrays.dtype_name("llm/embedder/input_embedding")
        if stored not in DTYPES:
            raise CheckpointError(
                f"arrays stored as {stored}; expected float32, float16 or bfloat16", path=path
            )
        target = target or DTYPES[stored]
        config = make_config(dims, final_logit_softcapping=final_logit_softcapping)
        config.dtype = target
        # Built on the meta device: no memory, no random init; the converted tensors become
        # the parameters themselves (assign=True), so there is never a second copy.
        with torch.device("meta"):
            model = PaliGemmaForConditionalGeneration(config)
        fams = families(dims, qkv)
        exact: ExactRows | None = None
        used = set()
        state: dict[str, torch.Tensor] = {}
        total = sum(len(list(iter_layers(f, dims))) for f in fams)
        with progress_bar(total=total, desc=f"loading {path.name}", unit="array", enabled=progress) as bar:
            for family in fams:
                used.add(bv_key(family))
                for layer in iter_layers(family, dims):
                    scanned = layout[family.tower][0]
                    if layer is not None and not scanned:
                        used.add(bv_key(family, layer))
                    array = read_family(arrays, family, dims, layer, scanned)
                    for name, tensor in zip(family.hf, family.to_hf(array, dims)):
                        if name == EMBEDDING:  # the head's decisive rows, before the cast
                            exact = keep_rows(tensor, decisive_token_ids(tok), target)
                        state[name.format(i=layer)] = _contiguous(tensor, target)
                    del array
                    bar.update(1)
        unused = sorted(set(arrays.keys()) - used)
        if unused:
            logger.warning("%s: %d arrays not used: %s", path, len(unused), ", ".join(unused[:5]))
    state["lm_head.weight"] = state[EMBEDDING]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"mapping table out of sync: missing {result.missing_keys}, extra {result.unexpected_keys}"
        )
    del state
    model.lm_head.weight = model.get_input_embeddings().weight  # one Parameter, as transformers ties them
    remember(model, exact)
    _init_buffers(model)
    _release_freed_memory()
    processor = make_processor(tok, dims.image_size, dims.patch)
    return model, processor


def _release_freed_memory() -> None:
    """Hand the per-layer read buffers back to the OS (glibc keeps freed heap pages resident,
    which after a 16-bit load leaves the file's float32 size in RSS for nothing)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _contiguous(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, contiguous, in ONE allocation (``.to(dtype).contiguous()`` makes two
    when the source is a transposed view; freed 16-bit copies fragment the heap: measured peak
    2× the model for a float32 → bfloat16 load, 1.1× with this)."""
    if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
        return _untransposed(tensor, dtype)
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype=dtype, memory_format=torch.contiguous_format)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


_TRANSPOSE_BLOCK = 64


def _untransposed(view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A transposed 2-D view (big_vision's ``[in, out]`` kernels as ``[out, in]``) copied into a
    contiguous ``dtype`` tensor 64 columns at a time: each block's source rows stay in cache.
    Measured 1.6–2× faster than one strided ``.to`` (3B MLP kernels: 104–144 → 66–84 ms each),
    the same values."""
    out = torch.empty(view.shape, dtype=dtype)
    for start in range(0, view.shape[1], _TRANSPOSE_BLOCK):
        out[:, start : start + _TRANSPOSE_BLOCK].copy_(view[:, start : start + _TRANSPOSE_BLOCK])
    return out


def _init_buffers(model: PaliGemmaForConditionalGeneration) -> None:
    """Recreate the non-persistent buffers a meta-device build leaves empty (in float32)."""
    for name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if buffer_name in ("inv_freq", "original_inv_freq"):
                fresh = type(module)(config=module.config)  # computes them on the CPU, float32
                value = getattr(fresh, buffer_name)
            elif buffer_name == "embed_scale":
                value = torch.tensor(module.scalar_embed_scale, dtype=torch.float32)
            elif buffer_name == "position_ids":
                value = torch.arange(module.num_positions).expand((1, -1))
            else:
                raise RuntimeError(f"don't know how to initialise buffer {name}.{buffer_name}")
            module.register_buffer(buffer_name, value, persistent=False)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")


def restore_rope_float32(model: torch.nn.Module) -> None:
    """Recompute rotary ``inv_freq`` buffers in float32 (``.to(bfloat16)`` rounds them, an error
    that grows with position). Call after casting a model with ``.to(dtype)``."""
    for module in model.modules():
        inv_freq = module.inv_freq if hasattr(module, "inv_freq") else None
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype == torch.float32:
            continue
        if not hasattr(module, "config"):
            continue
        fresh = type(module)(config=module.config)  # computes them on the CPU, float32
        for name in ("inv_freq", "original_inv_freq"):
            value = getattr(fresh, name, None) if hasattr(module, name) else None
            if isinstance(value, torch.Tensor):
                module.register_buffer(name, value.to(inv_freq.device), persistent=False)


def cast(model: torch.nn.Module, dtype: str | torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` that keeps the rotary frequencies in float32."""
    model.to(resolve_dtype(dtype))
    restore_rope_float32(model)
    return model


def _load_hf(
    path: Path, tokenizer: str | Path | None, target: torch.dtype | None
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    from transformers import PaliGemmaConfig

    try:
        config = PaliGemmaConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the HF model: {error}", path=path) from error
    # The processor first: its tokenizer names the head rows a lossy cast keeps (model.head).
    processor = _hf_processor(path, tokenizer, config)
    try:
        model = None
        if target is not None:
            model = _load_hf_cast(path, config, target, decisive_token_ids(processor.tokenizer))
        if model is None:
            model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=target or "auto")
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # SafetensorError: a truncated or corrupt model.safetensors (e.g. a copy cut short).
        raise CheckpointError(f"cannot load the HF model: {error}", path=path) from error
    restore_rope_float32(model)
    # A padded embedding (257216 rows for 257152 pieces) is fine; a smaller one would fail
    # later, deep in the model, with an IndexError on the first token past its end.
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding)  # Gemma's scaled embedding is one
    rows = embedding.num_embeddings
    pieces = sentencepiece_size(processor.tokenizer)
    if pieces > rows:
        raise CheckpointError(
            f"the tokenizer has {pieces} pieces but the model's embedding only {rows} rows: "
            "tokenizer and weights do not belong together",
            path=path,
        )
    return model, processor


def _hf_processor(path: Path, tokenizer: str | Path | None, config: Any) -> PaliGemmaProcessor:
    """The processor of an HF folder: ``tokenizer`` if given, else the folder's own."""
    vision = sub_configs(config)[1]
    image_size, patch = vision.image_size, vision.patch_size
    if tokenizer is not None:
        return make_processor(load_tokenizer(tokenizer), image_size, patch)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load the processor: {error}", path=path) from error
        if (path / HF_TOKENIZER).is_file():
            processor.tokenizer.spm_path = str((path / HF_TOKENIZER).resolve())
        return processor
    if (path / HF_TOKENIZER).is_file():
        return make_processor(load_tokenizer(path / HF_TOKENIZER), image_size, patch)
    raise CheckpointError("the folder has no tokenizer; pass the SentencePiece .model file", path=path)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a safetensors file by positioned reads, one tensor at a time.

    Not memory-mapped (as ``safe_open`` is): a mapped file's touched pages count in the
    process's RSS until it is closed, so a 16-bit folder cast while loading peaked at 2× the
    model (measured 2.0×); read like this, the file stays in the page cache, outside RSS.
    """
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(
                    f"cannot load the HF model: tensor {name} stored as {info['dtype']}", path=file
                )
            begin, end = info["data_offsets"]
            buffer = read_buffer(end - begin)
            handle.seek(start + begin)
            if handle.readinto(memoryview(buffer)[: end - begin]) != end - begin:
                raise CheckpointError(f"cannot load the HF model: {name}: file truncated", path=file)
            data = (
                torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin)
                if end > begin
                else torch.empty(0, dtype=torch.uint8)
            )
            yield name, data.view(dtype).reshape(info["shape"])


def _load_hf_cast(
    path: Path, config: Any, target: torch.dtype, keep_ids: list[int]
) -> PaliGemmaForConditionalGeneration | None:
    """An HF folder loaded straight into ``target``, tensor by tensor (peak ≈ the model in
    ``target``, not the model plus the mapped file as ``from_pretrained`` holds it). ``None``
    when the folder is already in ``target`` (``from_pretrained`` maps it for free) or is not
    one this reads (no safetensors): the caller falls back on ``from_pretrained``. The output
    head's ``keep_ids`` rows are kept in float32 when the cast loses precision (model.head)."""
    from transformers.core_model_loading import revert_weight_conversion

    files = _safetensors_files(path)
    if not files:
        return None
    with files[0].open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    stored = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    if {_SAFETENSORS_DTYPES.get(code) for code in stored} == {target}:
        return None
    config.dtype = target
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    markers = {name: torch.empty(0) for name in model.state_dict()}
    reverted = revert_weight_conversion(model, dict(markers))
    owner = {id(tensor): name for name, tensor in markers.items()}
    model_name = {saved: owner[id(tensor)] for saved, tensor in reverted.items()}
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, ExactRows | None] = {}
    for file in files:
        for saved, tensor in _read_safetensors(file):
            name = model_name.get(saved, saved)
            if name in (EMBEDDING, "lm_head.weight"):  # the head's decisive rows, before the cast
                kept[name] = keep_rows(tensor, keep_ids, target)
            if name in markers:
                state[name] = _contiguous(tensor, target)
            del tensor
    tied = "lm_head.weight" not in state
    if tied and EMBEDDING in state:
        state["lm_head.weight"] = state[EMBEDDING]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys:
        return None  # a layout this does not know: from_pretrained will say what is wrong
    del state
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight  # one Parameter, as transformers ties them
    remember(model, kept.get(EMBEDDING if tied else "lm_head.weight"))
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    _init_buffers(model)
    _release_freed_memory()
    return model


def _load_trained_folder(
    form: CheckpointForm, tokenizer: str | Path | None, target: torch.dtype | None, progress: bool
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Base checkpoint + the trained weights over it (the form a run's ``best/`` takes).

    Loaded in float32 unless ``target`` says otherwise: the trained weights are float32,
    and so the model is the one training validated.
    """
    from safetensors.torch import load_file

    assert form.base is not None  # identify() found it
    path, base = form.weights, form.base
    model, processor = load(
        base, tokenizer, target or torch.float32, progress=progress, revision=_base_revision(form)
    )
    try:
        weights = load_file(path / TRAINED_WEIGHTS)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {TRAINED_WEIGHTS}: {error}", path=path) from error
    params = dict(model.named_parameters())
    head = head_weight(model)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(
            f"{TRAINED_WEIGHTS} does not fit the base {base} (no parameter {unknown[0]})", path=path
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{name}: {tuple(tensor.shape)} in {TRAINED_WEIGHTS}, {tuple(params[name].shape)} "
                    f"in the base {base}",
                    path=path,
                )
            params[name].copy_(tensor)
            if params[name] is head:  # after the copy: kept rows track the version
                ids = decisive_token_ids(processor.tokenizer)
                remember(model, keep_rows(tensor, ids, head.dtype))
    return model, processor


def _base_revision(form: CheckpointForm) -> str | None:
    """The revision to load ``form.base`` at: a model name's recorded one (a path has none)."""
    return form.base_revision if isinstance(form.base, str) else None


def stored_dtype(path: str | Path, revision: str | None = None) -> str:
    """The dtype the bulk of a checkpoint is stored in: its embedding's (frozen in our recipes).

    What ``convert`` writes by default: a run trained from a float16 checkpoint converts back
    to float16 although its trained weights are float32.
    """
    from safetensors import safe_open

    if not Path(path).exists() and is_model_name(path):  # a Hub id or kaggle: handle, as load finds it
        path = resolve_checkpoint(path, revision, progress=False)[0]
    form = identify(path)
    if form.weights_form == "npz":
        with NpzArrays(form.weights) as arrays:
            return arrays.dtype_name("llm/embedder/input_embedding")
    if form.base is not None:  # trained weights or an adapter: the base's
        return stored_dtype(form.base, _base_revision(form))
    folder = form.weights
    index = folder / HF_WEIGHTS_INDEX
    file = None
    if index.is_file():  # names as saved: ours, or transformers' "original" ones
        weight_map = json.loads(index.read_text())["weight_map"]
        name = next((k for k in weight_map if k == EMBEDDING), None) or next(
            (k for k in weight_map if k.endswith("embed_tokens.weight")), None
        )
        file = folder / weight_map[name] if name else None
    if file is None and (folder / HF_WEIGHTS).is_file():
        file = folder / HF_WEIGHTS
    if file is None:
        raise CheckpointError(f"no {HF_WEIGHTS} (or {HF_WEIGHTS_INDEX}) in the folder", path=folder)
    with safe_open(str(file), framework="pt") as weights:
        keys = list(weights.keys())
        name = next((k for k in keys if k == EMBEDDING), None) or next(
            k for k in keys if k.endswith("embed_tokens.weight")
        )
        stored = weights.get_slice(name).get_dtype()
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if stored not in names:
        raise CheckpointError(f"embedding stored as {stored}; expected F32, F16 or BF16", path=file)
    return names[stored]


# ---------------------------------------------------------------------------------------------
# LoRA adapters (PEFT format)


def _load_lora_folder(
    form: CheckpointForm,
    tokenizer: str | Path | None,
    target: torch.dtype | None,
    device: str | torch.device | None,
    merge: bool,
) -> tuple[Any, PaliGemmaProcessor]:
    assert form.base is not None  # identify() found it
    model, processor = load(form.base, tokenizer, target, device, revision=_base_revision(form))
    return load_lora(model, form.weights, merge=merge), processor


def load_lora(model: PaliGemmaForConditionalGeneration, adapter_dir: str | Path, merge: bool = False) -> Any:
    """Apply a PEFT adapter folder to ``model``; ``merge=True`` folds it in and returns a plain model.

    Usage (``run/adapter`` as ``train`` writes it with ``trainable: lora``)::

        peft_model = load_lora(model, "run/adapter")
        merged = load_lora(model, "run/adapter", merge=True)
    """
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"cannot apply the LoRA adapter: {error}", path=adapter_dir) from error
    return peft_model.merge_and_unload().eval() if merge else peft_model.eval()
