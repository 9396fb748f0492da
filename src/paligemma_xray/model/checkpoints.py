"""Load and save PaliGemma checkpoints: big_vision ``.npz``, HF folders, PEFT LoRA adapters, run folders.

Example:

>>> import tempfile, pathlib
>>> from paligemma_xray.model.tiny import write_tiny_npz
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> npz, _ = write_tiny_npz(folder / "tiny.npz", version=2, dtype="bfloat16")
>>> model, processor = load(npz)                 # tokenizer found beside the npz
>>> model.dtype
torch.bfloat16
>>> save_npz(model, folder / "back.npz", dtype="bfloat16")     # bit-exact round trip
PosixPath('...back.npz')
>>> hf = save_hf(model, processor, folder / "hf")               # plain transformers folder
>>> model, processor = load(hf, dtype="float32")
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from paligemma_xray import atomic
from paligemma_xray.atomic import write_json
from paligemma_xray.errors import CheckpointError, ConfigError, check_output
from paligemma_xray.model.bigvision import (
    NpzArrays,
    NpzWriter,
    bv_key,
    dims_from_config,
    families,
    infer_dims,
    iter_layers,
    layer_layout,
    make_config,
    read_family,
    to_numpy,
    uses_qkv,
)
from paligemma_xray.model.hub import check_paligemma_folder, is_model_name, resolve_checkpoint
from paligemma_xray.model.processing import make_processor
from paligemma_xray.model.tokenizer import load_tokenizer, sentencepiece_size
from paligemma_xray.progress import bar as progress_bar

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")
EMBEDDING = "model.language_model.embed_tokens.weight"
#: A folder of trained weights only (a run's ``best/``): ``trained.json`` names the base
#: checkpoint (and tokenizer), ``trained.safetensors`` holds the weights training changed.
TRAINED_INFO = "trained.json"
TRAINED_WEIGHTS = "trained.safetensors"


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


def describe_file(path: Path) -> str:
    """What a file is, from its first bytes: for messages about a file given as a checkpoint."""
    try:
        with path.open("rb") as handle:
            head = handle.read(140)
    except OSError as error:
        return f"an unreadable file ({error.strerror or error})"
    suffix = path.suffix.lower()
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (zip)" if suffix in (".pt", ".pth", ".bin", ".ckpt") else "a zip archive"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[128:132] == b"DICM" or suffix in (".dcm", ".dicom"):
        return "a DICOM file"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return (
            "a lone safetensors weights file (an HF checkpoint is the folder holding it, with its "
            "config.json and tokenizer)"
        )
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp)"
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of an unknown kind"
    return "a text file"


def check_checkpoint(path: str | Path) -> Path:
    """Raise :class:`CheckpointError` now, before minutes of work, when ``path`` is no checkpoint.

    Reads no weights: only whether ``path`` is what :func:`load` takes (a big_vision .npz, an
    HF, LoRA or run folder), saying what a wrong file is (an image, a lone .safetensors …).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("checkpoint not found", path=path)
    if path.is_file():
        with path.open("rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"
        if not is_zip or path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
            raise CheckpointError(
                f"is {describe_file(path)}, not a checkpoint: expected a big_vision .npz file, or a folder "
                "(HF save_pretrained with config.json, LoRA adapter, or a training run)",
                path=path,
            )
        return path
    markers = ("adapter_config.json", "config.json", TRAINED_INFO)  # TRAINED_INFO: a run's best/
    if any((path / name).is_file() for name in markers):
        return path
    for sub in ("best", "last"):
        if any((path / sub / name).is_file() for name in markers):
            return path
    raise CheckpointError(
        "not a checkpoint: expected a .npz file, or a folder with config.json (HF), "
        "adapter_config.json (LoRA), or best/ or last/ (a run folder)",
        path=path,
    )


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
    tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    if not path.exists():
        raise CheckpointError("checkpoint not found", path=path)
    check_checkpoint(path)  # says what a wrong file is, before any weights are read
    if path.is_file():
        model, processor = _load_npz(path, tokenizer, target, final_logit_softcapping, progress)
    elif (path / TRAINED_INFO).is_file() and not (path / "adapter_config.json").is_file():
        model, processor = _load_trained_folder(path, tokenizer, target, progress)
    elif (path / "adapter_config.json").is_file():
        with transformers_progress(progress):
            return _load_lora_folder(path, tokenizer, target, device, merge_lora)
    elif (path / "config.json").is_file():
        check_paligemma_folder(path)
        with transformers_progress(progress):
            model, processor = _load_hf(path, tokenizer, target)
    else:
        for sub in ("best", "last"):
            markers = ("config.json", "adapter_config.json", TRAINED_INFO)
            if any((path / sub / name).is_file() for name in markers):
                return load(path / sub, tokenizer, dtype, device, merge_lora=merge_lora, progress=progress)
        raise CheckpointError(
            "not a checkpoint: expected a .npz file, or a folder with config.json (HF), "
            f"adapter_config.json (LoRA), {TRAINED_INFO} (trained weights), or best/ or last/ (a run folder)",
            path=path,
        )
    if device is not None:
        model.to(device)
    return model.eval(), processor


@contextlib.contextmanager
def transformers_progress(enabled: bool):
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
    for name in TOKENIZER_NAMES:
        if (npz.parent / name).is_file():
            return npz.parent / name
    raise CheckpointError(
        f"no tokenizer given and none beside the checkpoint ({' or '.join(TOKENIZER_NAMES)}); "
        "pass the SentencePiece .model file (--tokenizer)",
        path=npz,
    )


def _load_npz(path, tokenizer, target, final_logit_softcapping, progress):
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
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype=dtype, memory_format=torch.contiguous_format)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


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
        if (
            hasattr(module, "inv_freq")
            and hasattr(module, "config")
            and module.inv_freq.dtype != torch.float32
        ):
            fresh = type(module)(config=module.config)
            device = module.inv_freq.device
            module.register_buffer("inv_freq", fresh.inv_freq.to(device), persistent=False)
            if hasattr(module, "original_inv_freq"):
                module.register_buffer(
                    "original_inv_freq", fresh.original_inv_freq.to(device), persistent=False
                )


def cast(model: torch.nn.Module, dtype: str | torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` that keeps the rotary frequencies in float32."""
    model.to(resolve_dtype(dtype))
    restore_rope_float32(model)
    return model


def _load_hf(path: Path, tokenizer, target):
    try:
        model = _load_hf_cast(path, target) if target is not None else None
        if model is None:
            model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=target or "auto")
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # SafetensorError: a truncated or corrupt model.safetensors (e.g. a copy cut short).
        raise CheckpointError(f"cannot load the HF model: {error}", path=path) from error
    restore_rope_float32(model)
    image_size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    if tokenizer is not None:
        processor = make_processor(load_tokenizer(tokenizer), image_size, patch)
    elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load the processor: {error}", path=path) from error
        if (path / "tokenizer.model").is_file():
            processor.tokenizer.spm_path = str((path / "tokenizer.model").resolve())
    elif (path / "tokenizer.model").is_file():
        processor = make_processor(load_tokenizer(path / "tokenizer.model"), image_size, patch)
    else:
        raise CheckpointError("the folder has no tokenizer; pass the SentencePiece .model file", path=path)
    # A padded embedding (257216 rows for 257152 pieces) is fine; a smaller one would fail
    # later, deep in the model, with an IndexError on the first token past its end.
    rows = model.get_input_embeddings().num_embeddings
    pieces = sentencepiece_size(processor.tokenizer)
    if pieces > rows:
        raise CheckpointError(
            f"the tokenizer has {pieces} pieces but the model's embedding only {rows} rows: "
            "tokenizer and weights do not belong together",
            path=path,
        )
    return model, processor


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_safetensors(file: Path):
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
                raise CheckpointError(f"tensor {name} stored as {info['dtype']}", path=file)
            begin, end = info["data_offsets"]
            # An anonymous mapping, not the heap: given back to the OS the moment it is dropped
            # (glibc keeps freed multi-MB heap chunks resident; see NpzArrays.read).
            buffer = mmap.mmap(-1, max(end - begin, 1))
            handle.seek(start + begin)
            if handle.readinto(memoryview(buffer)[: end - begin]) != end - begin:
                raise CheckpointError(f"{name}: file truncated", path=file)
            data = (
                torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin)
                if end > begin
                else torch.empty(0, dtype=torch.uint8)
            )
            yield name, data.view(dtype).reshape(info["shape"])


def _load_hf_cast(path: Path, target: torch.dtype) -> PaliGemmaForConditionalGeneration | None:
    """An HF folder loaded straight into ``target``, tensor by tensor (peak ≈ the model in
    ``target``, not the model plus the mapped file as ``from_pretrained`` holds it). ``None``
    when the folder is already in ``target`` (``from_pretrained`` maps it for free) or is not
    one this reads (no safetensors): the caller falls back on ``from_pretrained``."""
    from transformers import PaliGemmaConfig
    from transformers.core_model_loading import revert_weight_conversion

    files = _safetensors_files(path)
    if not files:
        return None
    with files[0].open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    stored = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    if {_SAFETENSORS_DTYPES.get(code) for code in stored} == {target}:
        return None
    config = PaliGemmaConfig.from_pretrained(path)
    config.dtype = target
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    markers = {name: torch.empty(0) for name in model.state_dict()}
    reverted = revert_weight_conversion(model, dict(markers))
    owner = {id(tensor): name for name, tensor in markers.items()}
    model_name = {saved: owner[id(tensor)] for saved, tensor in reverted.items()}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for saved, tensor in _read_safetensors(file):
            name = model_name.get(saved, saved)
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
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    _init_buffers(model)
    _release_freed_memory()
    return model


def _recorded_base(path: Path) -> tuple[Path | str, Path | None, str | None]:
    """The base checkpoint, tokenizer and revision a trained-weights or adapter folder recorded.

    The base is a path, or a model name (Hub id, ``kaggle:`` handle) with its revision.
    """
    try:
        info = json.loads((path / TRAINED_INFO).read_text())
        recorded = str(info["base"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"unreadable {TRAINED_INFO}: {error}", path=path) from error
    tokenizer = info.get("tokenizer")
    revision = info.get("revision")
    base = Path(recorded)
    if not base.is_absolute() and is_model_name(recorded) and not (path / base).exists():
        return recorded, Path(tokenizer) if tokenizer else None, revision
    base = base if base.is_absolute() else path / base
    if not base.exists():
        raise CheckpointError(f"the base checkpoint {base} these weights were trained on is gone", path=path)
    return base, Path(tokenizer) if tokenizer else None, revision


def _load_trained_folder(path: Path, tokenizer, target, progress: bool):
    """Base checkpoint + the trained weights over it (the form a run's ``best/`` takes).

    Loaded in float32 unless ``target`` says otherwise: the trained weights are float32,
    and so the model is the one training validated.
    """
    from safetensors.torch import load_file

    base, recorded_tokenizer, revision = _recorded_base(path)
    model, processor = load(
        base, tokenizer or recorded_tokenizer, target or torch.float32, progress=progress, revision=revision
    )
    try:
        weights = load_file(path / TRAINED_WEIGHTS)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {TRAINED_WEIGHTS}: {error}", path=path) from error
    params = dict(model.named_parameters())
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
    return model, processor


def stored_dtype(path: str | Path, revision: str | None = None) -> str:
    """The dtype the bulk of a checkpoint is stored in: its embedding's (frozen in our recipes).

    What ``convert`` writes by default: a run trained from a float16 checkpoint converts back
    to float16 although its trained weights are float32.
    """
    from safetensors import safe_open

    if not Path(path).exists() and is_model_name(path):  # a Hub id or kaggle: handle, as load finds it
        path = resolve_checkpoint(path, revision, progress=False)[0]
    path = Path(path)
    if path.is_file():
        with NpzArrays(path) as arrays:
            return arrays.dtype_name("llm/embedder/input_embedding")
    if (path / TRAINED_INFO).is_file() and not (path / "adapter_config.json").is_file():
        base, _, recorded_revision = _recorded_base(path)
        return stored_dtype(base, recorded_revision)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and not (path / base).exists() and is_model_name(base):
            return stored_dtype(base, json.loads((path / "adapter_config.json").read_text()).get("revision"))
        base_path = Path(base) if base and Path(base).is_absolute() else path / str(base)
        return stored_dtype(base_path)
    index = path / "model.safetensors.index.json"
    file = None
    if index.is_file():  # names as saved: ours, or transformers' "original" ones
        weight_map = json.loads(index.read_text())["weight_map"]
        name = next((k for k in weight_map if k == EMBEDDING), None) or next(
            (k for k in weight_map if k.endswith("embed_tokens.weight")), None
        )
        file = path / weight_map[name] if name else None
    if file is None and (path / "model.safetensors").is_file():
        file = path / "model.safetensors"
    if file is not None:
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
    for sub in ("best", "last"):
        if (path / sub).is_dir():
            return stored_dtype(path / sub)
    raise CheckpointError("not a checkpoint", path=path)


# ---------------------------------------------------------------------------------------------
# LoRA adapters (PEFT format)


def _load_lora_folder(path: Path, tokenizer, target, device, merge: bool):
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"unreadable adapter_config.json: {error}", path=path) from error
    base = config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError("adapter_config.json names no base_model_name_or_path", path=path)
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (path / base_path) if (path / base_path).exists() else base_path
    if tokenizer is None and (path / TRAINED_INFO).is_file():  # a run's best/: the run's tokenizer
        tokenizer = _recorded_base(path)[1]
    if base_path.exists():
        model, processor = load(base_path, tokenizer, target, device)
    elif is_model_name(base):  # a Hub id (at the adapter's recorded revision) or a Kaggle handle
        model, processor = load(base, tokenizer, target, device, revision=config.get("revision"))
    else:
        raise CheckpointError(f"base model {base} of the adapter not found", path=path)
    return load_lora(model, path, merge=merge), processor


def load_lora(model: PaliGemmaForConditionalGeneration, adapter_dir: str | Path, merge: bool = False):
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


def save_lora(
    peft_model, out_dir: str | Path, base: str | Path | None = None, revision: str | None = None
) -> Path:
    """Save a ``PeftModel``'s adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``base``: the checkpoint the adapter applies to, recorded in ``adapter_config.json`` so
    that :func:`load` can find it (a path relative to ``out_dir`` or absolute, or a Hub id
    with its ``revision``, PEFT's own field for the base model's revision).
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError("save_lora needs a peft.PeftModel")
    out = Path(out_dir)
    if base is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(base)
            config.revision = revision
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


# ---------------------------------------------------------------------------------------------
# save


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
        config = json.loads((folder / "config.json").read_text())
        write_json(folder / "config.json", {**config, "dtype": "float32"})
    processor.save_pretrained(folder)
    spm = getattr(processor.tokenizer, "spm_path", None)
    if spm and Path(spm).is_file() and Path(spm).resolve() != (folder / "tokenizer.model").resolve():
        shutil.copyfile(spm, folder / "tokenizer.model")
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
    return _write_npz(lambda name: state[name], dims, path, dtype, prefix, scanned, progress)


def _write_npz(get, dims, path, dtype: str, prefix: str, scanned: bool, progress: bool) -> Path:
    """big_vision's npz from ``get(hf_name) -> tensor``, one array (or layer) in memory at a time."""
    qkv = dims.kv_heads == dims.heads
    path = check_output(path, folder=False)
    fams = families(dims, qkv)
    total = sum(len(list(iter_layers(f, dims))) for f in fams)

    def bv_array(family, layer):
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


# ---------------------------------------------------------------------------------------------
# convert


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
    if Path(src).exists():  # (a name that is not on disk: load says what it is)
        check_checkpoint(src)
    # Loaded straight in the output's dtype: one copy of the model in memory, not a float32
    # one and then a 16-bit one (a run of a float16 base holds float32 trained weights).
    stored = dtype or stored_dtype(src, revision)
    folder = _hf_folder(Path(src)) if Path(src).exists() else None
    if to == "npz" and folder is not None and tokenizer is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = _hf_to_npz(folder, out, stored, progress)
        beside = out.parent / "paligemma_tokenizer.model"
        if (folder / "tokenizer.model").is_file() and not beside.exists():
            with atomic.staged_path(beside) as tmp:
                shutil.copyfile(folder / "tokenizer.model", tmp)
        return path
    model, processor = load(src, tokenizer=tokenizer, dtype=stored, progress=progress, revision=revision)
    if to == "hf":
        return save_hf(model, processor, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_npz(model, out, dtype=stored, progress=progress)
    spm = getattr(processor.tokenizer, "spm_path", None)
    beside = out.parent / "paligemma_tokenizer.model"
    if spm and Path(spm).is_file() and not beside.exists():
        with atomic.staged_path(beside) as tmp:
            shutil.copyfile(spm, tmp)
    return path


def _hf_folder(path: Path) -> Path | None:
    """The plain HF folder ``path`` is (or a run folder's ``best/``/``last/`` that ``load`` picks)."""
    if path.is_file() or (path / "adapter_config.json").is_file() or (path / TRAINED_INFO).is_file():
        return None
    if (path / "config.json").is_file():
        return path
    for sub in ("best", "last"):
        markers = ("config.json", "adapter_config.json", TRAINED_INFO)
        if any((path / sub / name).is_file() for name in markers):
            return _hf_folder(path / sub)
    return None


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
        raise CheckpointError(f"cannot read config.json: {error}", path=folder) from error
    with torch.device("meta"):
        skeleton = PaliGemmaForConditionalGeneration(config)
    markers = {name: torch.empty(0) for name in skeleton.state_dict()}
    reverted = revert_weight_conversion(skeleton, dict(markers))
    owner = {id(tensor): name for name, tensor in markers.items()}
    saved_name = {owner[id(tensor)]: saved for saved, tensor in reverted.items()}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            weight_map = dict.fromkeys(weights.keys(), "model.safetensors")
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
        return _write_npz(get, dims_from_config(config), out, dtype, "params/", True, progress)
