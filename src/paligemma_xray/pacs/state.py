"""The resumable state file of a PACS run (``--state``), written atomically after each study.

``{"version": 1, "runs": {"<weights checksum>|<settings>": {"studies": {uid: {"status": "done", …}}}}}``:
the studies done for one model and its settings, so a rerun after a kill skips them without
asking the PACS.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paligemma_xray.errors import ConfigError

STATE_VERSION = 1


@dataclass
class PacsState:
    """What a run has done, per model and settings; saved atomically after every study."""

    path: Path
    key: str  # model checksum + settings
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, key: str) -> PacsState:
        path = Path(path)
        if not path.is_file():
            return cls(path, key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"state file is not readable JSON: {error}", path=path) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ConfigError("not a pacs state file of this version (remove it to start afresh)", path=path)
        runs = data.get("runs", {})
        return cls(path, key, dict(runs.get(key, {}).get("studies", {})))

    def done(self, study_uid: str) -> bool:
        return self.studies.get(study_uid, {}).get("status") == "done"

    def record(self, study_uid: str, **info: Any) -> None:
        from paligemma_xray.atomic import write_json

        self.studies[study_uid] = {"status": "done", "at": _now(), **info}
        data: dict[str, Any] = {"version": STATE_VERSION, "runs": {}}
        if self.path.is_file():
            # An unreadable or older state file is replaced: it only records what is already done.
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(self.path.read_text())
                if isinstance(old, dict) and old.get("version") == STATE_VERSION:
                    data = old
        data.setdefault("runs", {})[self.key] = {"studies": self.studies}
        write_json(self.path, data)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
