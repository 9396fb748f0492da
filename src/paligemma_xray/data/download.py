"""Download a Roboflow project version in the "paligemma" export format.

Goes through the optional ``roboflow`` package (``pip install 'paligemma-xray[roboflow]'``).
The API key comes from ``ROBOFLOW_API_KEY`` or a key file; it is handed to the client and
nowhere else: never printed, logged or written (anything the client prints passes through a
filter that masks it, and so do its error messages).

Example (needs network and a key, so not run here)::

    root = download("my-workspace", "bone-fracture", 2, out="data/fracture")
    # data/fracture/dataset/_annotations.train.jsonl, …
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import sys
from pathlib import Path

from paligemma_xray.data.layouts import open_dataset
from paligemma_xray.errors import ConfigError, DataError, check_output

ENV_KEY = "ROBOFLOW_API_KEY"
EXPORT_FORMAT = "paligemma"
MASK = "********"


def read_api_key(api_key_file: str | Path | None = None) -> str:
    """The key from ``api_key_file`` if given, else from ``ROBOFLOW_API_KEY``.

    Raises:
        ConfigError: no key, an empty key, or an unreadable key file (never showing the key).
    """
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ConfigError(f"cannot read the API key file: {reason}", path=path) from None
        if not key:
            raise ConfigError("the API key file is empty", path=path)
        return key
    key = os.environ.get(ENV_KEY, "").strip()
    if not key:
        raise ConfigError(f"no Roboflow API key: set {ENV_KEY} or pass --api-key-file FILE")
    return key


class _Masking(io.TextIOBase):
    """A text stream that forwards everything with the secret masked."""

    def __init__(self, target, secret: str):
        self._target, self._secret = target, secret

    def write(self, text: str) -> int:
        self._target.write(text.replace(self._secret, MASK))
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:  # keeps the client's progress bars drawing in place
        return bool(getattr(self._target, "isatty", lambda: False)())


def _roboflow():
    try:
        return importlib.import_module("roboflow")
    except ImportError:
        raise ConfigError(
            "the 'roboflow' package is not installed: pip install 'paligemma-xray[roboflow]'"
        ) from None


def _land(out: Path) -> None:
    """Move an export that unpacked its JSONL files at the top into ``out/dataset/``."""
    folder = out / "dataset"
    if any(folder.glob("_annotations.*.jsonl")):
        return
    top = sorted(out.glob("_annotations.*.jsonl"))
    if not top:
        return
    folder.mkdir(exist_ok=True)
    for path in sorted(p for p in out.iterdir() if p.is_file()):
        shutil.move(str(path), folder / path.name)


def download(
    workspace: str,
    project: str,
    version: int,
    *,
    out: str | Path | None = None,
    api_key_file: str | Path | None = None,
) -> Path:
    """Download ``workspace/project`` version ``version`` into ``out`` (Roboflow layout).

    Returns ``out``, which then holds ``dataset/_annotations.<split>.jsonl`` and the images.

    Raises:
        ConfigError: no key, or the ``roboflow`` package is missing.
        DataError: the download failed or did not produce the "paligemma" layout.
    """
    out = check_output(out if out is not None else f"{project}-{version}", folder=True)
    key = read_api_key(api_key_file)
    module = _roboflow()
    out.mkdir(parents=True, exist_ok=True)
    stdout, stderr = _Masking(sys.stdout, key), _Masking(sys.stderr, key)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            client = module.Roboflow(api_key=key)
            remote = client.workspace(workspace).project(project).version(int(version))
            remote.download(EXPORT_FORMAT, location=str(out), overwrite=True)
    except Exception as error:  # the client raises its own types for auth, 404 and network errors
        message = str(error).replace(key, MASK) or type(error).__name__
        raise DataError(
            f"Roboflow download of {workspace}/{project} version {version} failed: {message}", path=out
        ) from None
    _land(out)
    try:
        open_dataset(out)
    except DataError as error:
        reason = error.message
        raise DataError(f"the download did not produce a 'paligemma' export: {reason}", path=out) from None
    return out
