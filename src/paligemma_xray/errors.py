"""The project's error types.

Every mistake a user can make (bad file, bad flag, checkpoint that does not fit) raises a
subclass of :class:`PaligemmaXrayError`. The command line prints its message, without a
traceback, and exits with :attr:`PaligemmaXrayError.exit_code`. Anything else is a bug in
this project and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class PaligemmaXrayError(Exception):
    """A problem the user can fix; its message says what and where."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        self.path = Path(path) if path is not None else None
        self.line = line
        self.message = message
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class DataError(PaligemmaXrayError):
    """A data set, record or annotation that cannot be used."""


class ImageLoadError(DataError):
    """An image or DICOM file that cannot be decoded."""


class CheckpointError(PaligemmaXrayError):
    """A checkpoint that cannot be read, written or mapped onto the model."""


class ConfigError(PaligemmaXrayError):
    """A recipe, flag or configuration value that does not fit."""


def check_output(path: str | Path, *, folder: bool) -> Path:
    """Raise :class:`ConfigError` now, before any work, where ``path`` cannot be written.

    ``folder=True``: ``path`` is a folder to create or fill; else a file to create or
    replace. Creates nothing. Catches a path that exists as the other kind, a parent that
    is a file, and a parent that is not writable (a read-only file system included).
    """
    import os

    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError("exists and is not a folder", path=path)
        if not folder and path.is_dir():
            raise ConfigError("is a folder; give a file name", path=path)
        target = path if folder else path.parent
    else:
        target = path.parent
    target = Path(os.path.abspath(target))
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise ConfigError(f"cannot create it: {target} is a file, not a folder", path=path)
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write it: {target} is not writable", path=path)
    # os.access trusts permission bits; a pseudo file system (/proc, /sys) or a full or
    # read-only mount says no only when asked: a probe folder, removed at once, asks.
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=target))
    except OSError as error:
        import errno

        # mkdir's ENOENT in a folder that exists: a pseudo file system that takes no new entries.
        reason = "accepts no new files" if error.errno == errno.ENOENT else (error.strerror or str(error))
        raise ConfigError(f"cannot write it: {target}: {reason}", path=path) from None
    return path
