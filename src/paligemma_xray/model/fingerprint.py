"""Model identity: which weights made an output, by their files or by the loaded tensors.

Two checksums, for two questions:

* :func:`fingerprint` — the files of the checkpoint ``model.load`` reads for a path
  (:func:`~paligemma_xray.model.forms.identify`: a run folder's ``best/`` or ``last/``, an
  adapter's or trained-weights folder's base included). ``predict`` records it in its
  manifest so that ``--resume`` with other weights is refused; ``calibration.json`` records
  it so that a calibration is applied only to the weights it was fitted on. Hashing
  gigabytes on every load would be slow, so each file is listed with its size and
  modification time: a file whose size and time match a previous fingerprint (or one hashed
  earlier in this process) reuses that hash.
* :func:`weights_checksum` — the tensors of a loaded model (names, dtypes, shapes, bytes),
  whatever file they came from: the algorithm identity DICOM SRs carry (:class:`Algorithm`).

Example:

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "config.json").write_text("{}")
>>> _ = (folder / "model.safetensors").write_bytes(b"weights")
>>> first = fingerprint(folder)
>>> sorted(first["files"])
['config.json', 'model.safetensors']
>>> fingerprint(folder, previous=first)["sha256"] == first["sha256"]
True
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paligemma_xray.errors import CheckpointError, ConfigError
from paligemma_xray.model.forms import CheckpointForm, identify
from paligemma_xray.version import __version__

ALGORITHM_NAME = "paligemma-xray"
_CHUNK = 1 << 20
#: Base checkpoints named by a Hub id or ``kaggle:`` handle: identified by name and revision.
_NAMED_BASE = "base"
# File hashes of this process, by (path, size, mtime_ns, inode): a file is read once. A hash
# under way (:func:`start`'s thread) is a pending future: a second caller waits for it.
_HASHES: dict[tuple[str, int, int, int], Future[str]] = {}
_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key(file: Path) -> tuple[str, int, int, int]:
    stat = file.stat()
    return (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _hash(file: Path, key: tuple[str, int, int, int]) -> str:
    """``file``'s SHA-256, read once per process even when two threads ask at once."""
    with _LOCK:
        pending = _HASHES.get(key)
        if pending is None:
            future: Future[str] = Future()
            _HASHES[key] = future
    if pending is not None:
        return pending.result()
    try:
        future.set_result(_sha256(file))
    except BaseException as error:
        with _LOCK:
            del _HASHES[key]  # a later call reads the file again
        future.set_exception(error)
        raise
    return future.result()


def _known(sha256: str) -> Future[str]:
    future: Future[str] = Future()
    future.set_result(sha256)
    return future


def start(path: str | Path) -> None:
    """Begin hashing the weight files of ``path`` on a background thread (hashlib and file
    reads release the GIL), so that the :func:`fingerprint` ``predict`` records costs no time
    of its own: started before a model loads, the 3B model's 5.85 GB are hashed while it
    loads, not after (measured: 3.9 s of predict's time on 8 images). Errors are left to
    :func:`fingerprint` (and to the load, which says what is wrong with a path)."""
    path = Path(path).expanduser()
    try:
        files = [entry for entry in _entries(identify(path)).values() if isinstance(entry, Path)]
    except (CheckpointError, ConfigError, OSError):  # the load that follows says what is wrong
        return

    def work() -> None:
        for file in files:
            with contextlib.suppress(OSError):
                _hash(file, _key(file))

    threading.Thread(target=work, name="fingerprint", daemon=True).start()


def _entries(form: CheckpointForm, prefix: str = "") -> dict[str, Path | str]:
    """Name → file (or a named base's ``name@revision``) of every file making ``form``'s model."""
    found: dict[str, Path | str] = {prefix + name: file for name, file in form.weight_files().items()}
    if isinstance(form.base, Path):
        found.update(_entries(identify(form.base), f"{prefix}{_NAMED_BASE}/"))
    elif form.base is not None:
        found[prefix + _NAMED_BASE] = f"{form.base}@{form.base_revision or 'main'}"
    return found


def fingerprint(path: str | Path, previous: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{"sha256": …, "files": {name: [size, mtime_ns, sha256]}}`` of the weights at ``path``.

    The files of the checkpoint :func:`~paligemma_xray.model.forms.identify` resolves ``path``
    to (so a run folder and its ``best/`` have the same fingerprint), named within it, its
    base's under ``base/``; calibrations, a run's logs and resumable state do not count.
    ``None`` when ``path`` is not on disk (a Hub id, an in-memory model): such a model is
    known by its id alone. ``previous``: an earlier fingerprint whose per-file hashes are
    reused for files of the same size and modification time.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return None
    known = (previous or {}).get("files", {})
    files: dict[str, list[Any]] = {}
    for name, entry in sorted(_entries(identify(path)).items()):
        if isinstance(entry, str):  # a base known by name
            files[name] = [0, 0, hashlib.sha256(entry.encode()).hexdigest()]
            continue
        key = _key(entry)
        _, size, mtime_ns, _ = key
        old = known.get(name)
        if old is not None and old[0] == size and old[1] == mtime_ns:
            with _LOCK:
                _HASHES.setdefault(key, _known(old[2]))  # trusted as for this call: the next one too
            files[name] = list(old)
            continue
        files[name] = [size, mtime_ns, _hash(entry, key)]
    total = hashlib.sha256()
    for name, (size, _, sha) in sorted(files.items()):
        total.update(f"{name}\0{size}\0{sha}\n".encode())
    return {"sha256": total.hexdigest(), "files": files}


# -- the loaded model's identity (DICOM SR) ------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    """What made the detections: written into every SR (TID 4019 and the device observer)."""

    model_id: str
    checksum: str  # SHA-256 of the model's weights (names, dtypes, shapes, bytes)
    name: str = ALGORITHM_NAME
    version: str = __version__

    @property
    def parameters(self) -> list[str]:
        return [f"model={self.model_id}", f"sha256={self.checksum}"]


_CHECKSUMS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def weights_checksum(model: Any) -> str:
    """SHA-256 over a torch module's state dict (sorted names, dtype, shape, raw bytes).

    The loaded weights, not the files: the same model read from an ``.npz`` or an HF folder
    gets the same id, and a run folder's optimizer state does not count. Cached per module.
    """
    cached = _CHECKSUMS.get(model)
    if cached is not None:
        return cached
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    _CHECKSUMS[model] = digest.hexdigest()
    return _CHECKSUMS[model]
