"""A checkpoint's fingerprint: which weights made an output folder.

``predict`` records it in its manifest so that ``--resume`` with another model is refused
instead of keeping the old model's results. Hashing gigabytes on every resume would be
slow, so a fingerprint lists each file with its size and modification time: a file whose
size and time match the previous fingerprint reuses its recorded hash.

Example:

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "model.safetensors").write_bytes(b"weights")
>>> first = fingerprint(folder)
>>> fingerprint(folder, previous=first)["sha256"] == first["sha256"]
True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# Run-folder parts that do not make the served model (resumable state, logs).
_SKIPPED_FOLDERS = {"checkpoints", "tb", "__pycache__"}
_CHUNK = 1 << 20


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found: list[Path] = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_FOLDERS and not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if not f.startswith("."))
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | Path, previous: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{"sha256": …, "files": {name: [size, mtime_ns, sha256]}}`` of the checkpoint at ``path``.

    ``None`` when ``path`` is not on disk (a Hub id, an in-memory model): such a model is
    known by its id alone. ``previous``: an earlier fingerprint whose per-file hashes are
    reused for files of the same size and modification time.
    """
    path = Path(path)
    if not path.exists():
        return None
    known = (previous or {}).get("files", {})
    files: dict[str, list] = {}
    for file in _files(path):
        stat = file.stat()
        name = file.name if file == path else file.relative_to(path).as_posix()
        old = known.get(name)
        if old is not None and old[0] == stat.st_size and old[1] == stat.st_mtime_ns:
            files[name] = list(old)
        else:
            files[name] = [stat.st_size, stat.st_mtime_ns, _sha256(file)]
    total = hashlib.sha256()
    for name, (size, _, sha) in sorted(files.items()):
        total.update(f"{name}\0{size}\0{sha}\n".encode())
    return {"sha256": total.hexdigest(), "files": files}
