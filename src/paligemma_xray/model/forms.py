"""Which checkpoint form is this path? The one place that answers it (no torch, reads no weights).

Every reader and writer of checkpoints asks :func:`identify`: ``model.load``, ``save_hf``,
``convert``, ``check_checkpoint``, ``stored_dtype``, the weights' fingerprint, where a
model's ``calibration.json`` lives, and training's run folder. The marker file names and the
rule that picks a run folder's ``best/`` over its ``last/`` are written here only.

The forms:

* ``npz`` — a big_vision ``.npz`` file; its SentencePiece model beside it
  (``paligemma_tokenizer.model`` or ``tokenizer.model``);
* ``hf`` — a ``save_pretrained`` folder (``config.json``);
* ``adapter`` — a PEFT LoRA adapter folder (``adapter_config.json`` naming its base);
* ``trained`` — trained weights over a base (``trained.json`` naming the base and tokenizer,
  ``trained.safetensors``): a run's ``best/``;
* ``run`` — a training run folder: its ``best/`` when that holds a checkpoint, else ``last/``.

Example:

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> (folder / "run" / "last").mkdir(parents=True)
>>> _ = (folder / "run" / "last" / CONFIG).write_text("{}")
>>> form = identify(folder / "run")
>>> form.form, form.weights_form, form.weights.name, form.calibration.relative_to(folder).as_posix()
('run', 'hf', 'last', 'run/last/calibration.json')
>>> calibration_file(pathlib.Path("runs/x/model.npz")).as_posix()
'runs/x/model.calibration.json'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from paligemma_xray.errors import CheckpointError

Form = Literal["npz", "hf", "adapter", "trained", "run"]

#: An HF ``save_pretrained`` folder.
CONFIG = "config.json"
#: HF weights: one file, or shards listed in the index.
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
#: A PEFT LoRA adapter folder; its weights.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: A folder of trained weights only (a run's ``best/``): ``trained.json`` names the base
#: checkpoint (and tokenizer), ``trained.safetensors`` holds the weights training changed.
TRAINED_INFO = "trained.json"
TRAINED_WEIGHTS = "trained.safetensors"
#: A run folder's checkpoints, in the order they are preferred; the adapter inside ``last/``.
BEST = "best"
LAST = "last"
RUN_CHECKPOINTS = (BEST, LAST)
RUN_ADAPTER = "adapter"
#: SentencePiece model names: beside an npz (big_vision's name first), inside an HF folder.
NPZ_TOKENIZER = "paligemma_tokenizer.model"
HF_TOKENIZER = "tokenizer.model"
TOKENIZER_NAMES = (NPZ_TOKENIZER, HF_TOKENIZER)
#: The calibration saved with a model: inside a folder, or ``<stem>.calibration.json`` beside an npz.
CALIBRATION_FILE = "calibration.json"
#: Files given as a checkpoint that are a pickled PyTorch state, never a big_vision npz.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

KAGGLE_PREFIX = "kaggle:"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_SUFFIXES = (".npz", ".json", ".safetensors", ".model", ".yaml", ".yml")
_NOT_A_CHECKPOINT = (
    f"not a checkpoint: expected a .npz file, or a folder with {CONFIG} (HF), {ADAPTER_CONFIG} "
    f"(LoRA), {TRAINED_INFO} (trained weights), or {BEST}/ or {LAST}/ (a run folder)"
)


def is_model_name(ref: str | Path) -> bool:
    """True when ``ref`` reads as a Hub id (``org/name``) or a ``kaggle:`` handle, not a path.

    Spelling only: whether a local path of that name exists is for the caller to check first.
    """
    text = str(ref)
    if text.startswith(KAGGLE_PREFIX):
        return True
    return (
        isinstance(ref, str)
        and _REPO_ID.fullmatch(text) is not None
        and ".." not in text
        and "--" not in text
        and not text.lower().endswith(_FILE_SUFFIXES)
    )


def calibration_file(weights: Path) -> Path:
    """Where the calibration of the checkpoint ``weights`` (a file or a folder) lives."""
    if weights.suffix == ".npz" or weights.is_file():
        return weights.with_name(f"{weights.stem}.calibration.json")
    return weights / CALIBRATION_FILE


@dataclass(frozen=True)
class CheckpointForm:
    """What :func:`identify` found at ``path``.

    ``form``: what ``path`` is; ``weights``: the checkpoint ``model.load`` reads (``path``
    itself, or a run folder's ``best/`` or ``last/``), of form ``weights_form`` (never
    ``run``). ``base``: the checkpoint an ``adapter`` or ``trained`` folder applies to (an
    existing path, or a model name with ``base_revision``). ``tokenizer``: the SentencePiece
    file known for these weights (beside an npz; recorded by training), else None (an HF
    folder's own).
    """

    form: Form
    path: Path
    weights: Path
    weights_form: Form
    base: Path | str | None = None
    base_revision: str | None = None
    tokenizer: Path | None = None

    @property
    def calibration(self) -> Path:
        """The ``calibration.json`` fitted to these weights: with ``weights``, never elsewhere."""
        return calibration_file(self.weights)

    def weight_files(self) -> dict[str, Path]:
        """The files whose bytes make this checkpoint's model, by name within ``weights``.

        An npz: the file. A folder: every file directly in it but calibrations and exports
        (a run's ``last/model.npz``), since configs and tokenizers shape the answers too. The
        base of an ``adapter``/``trained`` folder is not included (see :attr:`base`).
        """
        if self.weights_form == "npz":
            return {self.weights.name: self.weights}
        return {
            file.name: file
            for file in sorted(self.weights.iterdir())
            if file.is_file()
            and not file.name.startswith(".")
            and not file.name.endswith(CALIBRATION_FILE)
            and file.suffix != ".npz"
        }


def _folder_form(folder: Path) -> Form | None:
    """The form of a checkpoint folder by its markers, or None (a run folder or no checkpoint)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / TRAINED_INFO).is_file():
        return "trained"
    if (folder / CONFIG).is_file():
        return "hf"
    return None


def describe_file(path: Path) -> str:
    """What a file is, from its first bytes: for messages about a file given as a checkpoint."""
    try:
        with path.open("rb") as handle:
            head = handle.read(140)
    except OSError as error:
        return f"an unreadable file ({error.strerror or error})"
    suffix = path.suffix.lower()
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (zip)" if suffix in _PICKLE_SUFFIXES else "a zip archive"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[128:132] == b"DICM" or suffix in (".dcm", ".dicom"):
        return "a DICOM file"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return (
            "a lone safetensors weights file (an HF checkpoint is the folder holding it, with its "
            f"{CONFIG} and tokenizer)"
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


def _read_json(file: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"unreadable {file.name}: {error}", path=folder) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"unreadable {file.name}: not a JSON object", path=folder)
    return data


def _trained_info(folder: Path) -> tuple[Path | str, str | None, Path | None]:
    """(base, revision, tokenizer) that ``trained.json`` records; the base checked to exist."""
    info = _read_json(folder / TRAINED_INFO, folder)
    if "base" not in info:
        raise CheckpointError(f"unreadable {TRAINED_INFO}: no 'base'", path=folder)
    recorded = str(info["base"])
    tokenizer = Path(info["tokenizer"]) if info.get("tokenizer") else None
    revision = info.get("revision")
    base = Path(recorded)
    if not base.is_absolute() and is_model_name(recorded) and not (folder / base).exists():
        return recorded, revision, tokenizer
    base = base if base.is_absolute() else folder / base
    if not base.exists():
        raise CheckpointError(
            f"the base checkpoint {base} these weights were trained on is gone", path=folder
        )
    return base, revision, tokenizer


def _adapter_base(folder: Path) -> tuple[Path | str, str | None]:
    """(base, revision) an adapter folder's ``adapter_config.json`` names; checked to exist."""
    config = _read_json(folder / ADAPTER_CONFIG, folder)
    base = config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{ADAPTER_CONFIG} names no base_model_name_or_path", path=folder)
    base_path = Path(base)
    if not base_path.is_absolute() and (folder / base_path).exists():
        base_path = folder / base_path
    if base_path.exists():
        return base_path, None
    if is_model_name(base):  # a Hub id (at the adapter's recorded revision) or a Kaggle handle
        return str(base), config.get("revision")
    raise CheckpointError(f"base model {base} of the adapter not found", path=folder)


def identify(path: str | Path) -> CheckpointForm:
    """The form of the checkpoint at ``path`` and what ``model.load`` reads of it.

    Reads no weights, only markers and the small JSON files naming a base. Raises
    :class:`CheckpointError` when ``path`` is missing or no checkpoint (saying what a wrong
    file is: an image, a lone .safetensors …), or names a base that is gone. A model name
    (Hub id, ``kaggle:`` handle) is resolved to a local path by ``model.hub`` first.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("checkpoint not found", path=path)
    if path.is_file():
        with path.open("rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"
        if not is_zip or path.suffix.lower() in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"is {describe_file(path)}, not a checkpoint: expected a big_vision .npz file, or a folder "
                f"(HF save_pretrained with {CONFIG}, LoRA adapter, or a training run)",
                path=path,
            )
        beside = next((path.parent / n for n in TOKENIZER_NAMES if (path.parent / n).is_file()), None)
        return CheckpointForm("npz", path, path, "npz", tokenizer=beside)
    form = _folder_form(path)
    if form is None:
        for sub in RUN_CHECKPOINTS:  # the best/-over-last/ rule: here only
            if _folder_form(path / sub) is not None:
                return replace(identify(path / sub), form="run", path=path)
        raise CheckpointError(_NOT_A_CHECKPOINT, path=path)
    if form == "hf":
        return CheckpointForm("hf", path, path, "hf")
    if form == "trained":
        base, revision, tokenizer = _trained_info(path)
        return CheckpointForm("trained", path, path, "trained", base, revision, tokenizer)
    base, revision = _adapter_base(path)
    # A run's best/ of a LoRA run also holds trained.json: the run's tokenizer.
    tokenizer = _trained_info(path)[2] if (path / TRAINED_INFO).is_file() else None
    return CheckpointForm("adapter", path, path, "adapter", base, revision, tokenizer)


def check_checkpoint(path: str | Path) -> Path:
    """Raise :class:`CheckpointError` now, before minutes of work, when ``path`` is no checkpoint.

    Reads no weights: only whether ``path`` is what ``model.load`` takes (a big_vision .npz,
    an HF, LoRA, trained-weights or run folder), saying what a wrong file is.
    """
    return identify(path).path
