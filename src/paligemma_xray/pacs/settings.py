"""The ``pacs`` verb's settings: decoding (from ``infer``) plus the PACS, the selection, the state.

One declaration gives ``pacs``'s flags, ``--help``, ``--config`` keys and checks
(:mod:`paligemma_xray.settings`); :func:`paligemma_xray.pacs.run` takes it. No torch here.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import field
from typing import Annotated

from pydantic import model_validator
from pydantic.dataclasses import dataclass

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer.settings import DetectSettings, is_detection_prompt
from paligemma_xray.locations import DEFAULT_PROMPT
from paligemma_xray.pacs.client import check_url
from paligemma_xray.settings import SETTINGS_CONFIG, Float, StrList, flag

DEFAULT_MODALITIES = ("CR", "DX")


def parse_since(text: str | None) -> datetime.date | None:
    """``--since``: YYYY-MM-DD or YYYYMMDD."""
    if text is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise ConfigError(f"--since takes a date as YYYY-MM-DD, not {text!r}")


def parse_modalities(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--modality CR,DX`` → ("CR", "DX"); an empty value means every image modality."""
    if text is None:
        return DEFAULT_MODALITIES
    items = text.split(",") if isinstance(text, str) else list(text)
    found = tuple(m.strip().upper() for m in items if m.strip())
    for modality in found:
        if not modality.isalnum() or len(modality) > 16:
            raise ConfigError(f"--modality takes DICOM modality codes like CR,DX, not {modality!r}")
    return found


@dataclass(config=SETTINGS_CONFIG)
class PacsSettings(DetectSettings):
    """Query a PACS over DICOMweb, detect, store SRs back (``pacs``)."""

    url: Annotated[str, flag(metavar="URL", required=True)] = ""
    """DICOMweb root, e.g. http://orthanc:8042/dicom-web."""
    studies: Annotated[StrList, flag("--study", metavar="UID", append=True)] = field(default_factory=list)
    """Only this Study Instance UID (repeatable; default: every study)."""
    since: Annotated[str | None, flag(metavar="DATE")] = None
    """Only studies from DATE (YYYY-MM-DD) on, by Study Date."""
    modality: Annotated[str, flag(metavar="M,M")] = ",".join(DEFAULT_MODALITIES)
    """Series modalities to detect on (comma-separated; empty: every image modality)."""
    prompt: Annotated[str, flag(metavar="P")] = DEFAULT_PROMPT
    """Detection prompt."""
    threshold: Annotated[Float | None, flag(metavar="T")] = None
    """Report boxes scored at least T (default: all)."""
    secondary_capture: bool = False
    """Also store the image with its boxes drawn (Secondary Capture)."""
    state: Annotated[str, flag(metavar="FILE")] = "pacs-state.json"
    """Progress file for resuming."""
    credentials: Annotated[str | None, flag(metavar="FILE")] = None
    """JSON file {"user": …, "password": …} or {"token": …} (default: the environment)."""
    retries: Annotated[int, flag(metavar="N")] = 5
    """Retries of a failed request, with exponential backoff."""
    backoff: Annotated[Float, flag(metavar="S")] = 1.0
    """First wait between retries in seconds, doubled each time."""
    timeout: Annotated[Float, flag(metavar="S")] = 60.0
    """Seconds to wait for one HTTP answer."""
    watch: bool = False
    """Keep polling for new studies (Ctrl-C stops)."""
    interval: Annotated[Float, flag(metavar="S")] = 60.0
    """Seconds between polls with --watch."""

    @model_validator(mode="after")
    def _fits(self) -> PacsSettings:
        check_url(self.url)
        parse_since(self.since)
        parse_modalities(self.modality)
        if not is_detection_prompt(self.prompt):
            raise ConfigError(f"pacs needs a detection prompt ('detect …'), not {self.prompt!r}")
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise ConfigError("--retries and --backoff must be >= 0 and the timeout > 0")
        if self.interval <= 0:
            raise ConfigError("--interval must be > 0 seconds")
        return self

    @property
    def since_date(self) -> datetime.date | None:
        """``since`` as a date."""
        return parse_since(self.since)

    @property
    def modalities(self) -> tuple[str, ...]:
        """``modality`` as codes (empty: every image modality)."""
        return parse_modalities(self.modality)
