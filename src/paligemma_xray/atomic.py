"""Writing outputs so that nothing half-written ever sits under a final name.

Every file and folder this project writes goes through this module: the content is written
to a hidden temporary sibling (same folder, so the rename stays on one file system) and
renamed onto the final name only once it is complete. A full disk, a read-only folder or a
kill mid-write leaves the final name as it was (absent, or the previous complete version)
and at most a hidden ``.NAME.tmp-…`` sibling, which the next write of the same name removes.
"Disk full" and "permission denied" become one :class:`OutputError` line naming the path.

Example:

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> write_json(out / "metrics.json", {"map50": 0.5}).read_text()
'{\\n  "map50": 0.5\\n}\\n'
>>> with staged_path(out / "image.png") as tmp:
...     _ = tmp.write_bytes(b"png bytes")   # any library that writes to a path
>>> sorted(p.name for p in out.iterdir())
['image.png', 'metrics.json']
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from paligemma_xray.errors import PaligemmaXrayError

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class OutputError(PaligemmaXrayError):
    """An output that could not be written (disk full, read-only, no permission)."""


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn the ``OSError`` of a full disk or a read-only / forbidden folder into an :class:`OutputError`.

    Other ``OSError``\\ s are bugs or user mistakes that already say what they are; they pass.
    """
    try:
        yield
    except OSError as error:
        reason = _DISK_ERRORS.get(error.errno or -1)
        if reason is None:
            raise
        raise OutputError(f"cannot write: {reason}", path=path) from error


@contextlib.contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    For libraries that write to a path themselves (``PIL.Image.save``, ``safetensors``,
    ``np.savez``, ``save_pretrained``): hand them the yielded path. On any error the
    temporary is removed and ``path`` is left untouched. Works for files and for folders
    (a folder that replaces an existing one: the old one is moved aside first, then removed).
    """
    final = Path(path)
    tmp = _temporary_sibling(final)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            if tmp.is_dir() and final.exists():
                old = _temporary_sibling(final)
                os.replace(final, old)
                os.replace(tmp, final)
                _remove(old)
            elif tmp.exists():
                os.replace(tmp, final)
            else:
                raise FileNotFoundError(f"nothing was written to the temporary path for {final}")
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; it replaces ``path`` when the block succeeds."""
    with staged_path(path) as tmp:
        tmp.mkdir()
        yield tmp


@contextlib.contextmanager
def open_for_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose content appears under ``path`` only once the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_for_write takes mode 'w' or 'wb', not {mode!r}")
    with staged_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with open_for_write(path, "wb") as file:
        file.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with open_for_write(path, "w") as file:
        file.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove the ``.NAME.tmp-…`` leftovers of killed writes in ``folder``; returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for leftover in folder.glob(".*.tmp-*"):
        _remove(leftover)
        removed += 1
    return removed


def check_fresh(path: str | Path, *, overwrite: bool, what: str = "output") -> Path:
    """Refuse to replace an existing, non-empty ``path`` unless ``overwrite`` (``--overwrite``).

    Writing verbs call this before any work, so that an earlier data set, model or
    evaluation is never replaced, or merged with a new one, by accident. An empty folder
    counts as fresh. Raises :class:`~paligemma_xray.errors.ConfigError` naming the path.
    """
    from paligemma_xray.errors import ConfigError

    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return path
    if path.is_dir() and not path.is_symlink():
        with disk_errors(path):
            if next(path.iterdir(), None) is None:
                return path
    raise ConfigError(f"the {what} is already there; add --overwrite to replace it", path=path)
