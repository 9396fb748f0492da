"""Progress output: one policy for every long job (tqdm underneath).

On a terminal a bar redraws in place, as tqdm does. When stderr is not a terminal (a log
file, a pipe, CI) a redrawn bar becomes one line of thousands of characters, so there the
bar prints a plain line every :data:`LOG_INTERVAL_S` seconds (and one when it ends).
``--no-progress`` on every long verb turns all of it off (:func:`set_enabled`), and so does
a caller's own ``progress=False``.

Example:

>>> total = 0
>>> for i in bar(range(3), desc="work", enabled=False):
...     total += i
>>> total
3
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between plain progress lines when stderr is not a terminal

_state = {"enabled": True}


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar of the process on or off (the CLI's ``--no-progress``)."""
    _state["enabled"] = bool(enabled)


def is_enabled(requested: bool = True) -> bool:
    """Whether a bar asked for with ``progress=requested`` is shown."""
    return bool(requested) and _state["enabled"]


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A file for tqdm that turns each redraw (``\\r…``) into one plain line."""

    def __init__(self, target: IO[str]) -> None:
        self.target = target

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    **options: Any,
) -> tqdm:
    """A tqdm bar under the policy above; ``enabled=False`` (or ``--no-progress``) shows nothing."""
    if not is_terminal():
        options = {
            "file": _Lines(sys.stderr),
            "mininterval": LOG_INTERVAL_S,
            "ascii": True,
            "ncols": 100,
            **options,
        }
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not is_enabled(enabled), **options)
