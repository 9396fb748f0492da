"""The ``serve`` verb's settings (:class:`ServeSettings`) and the app's (:class:`ServeConfig`).

:class:`ServeSettings` is the decoding (from ``infer``) plus where and how to serve: its
fields give ``serve``'s flags, ``--help`` and ``--config`` keys (:mod:`paligemma_xray.settings`).
:class:`ServeConfig` is what the running app needs (the batching limits and the API key,
which comes from the environment, never from a flag or a file). No torch, no FastAPI here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass as plain_dataclass
from dataclasses import field
from typing import Annotated, Literal

from pydantic import model_validator
from pydantic.dataclasses import dataclass

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer.settings import DecodeSettings
from paligemma_xray.settings import SETTINGS_CONFIG, Float, StrList, flag

API_KEY_ENV = "PALIGEMMA_XRAY_API_KEY"


def api_key_from_env() -> str | None:
    """The API key from ``PALIGEMMA_XRAY_API_KEY`` (empty means none)."""
    return os.environ.get(API_KEY_ENV) or None


@plain_dataclass(frozen=True)
class ServeConfig:
    """What the running app needs: batching limits, upload limits, the API key."""

    max_batch: int = 8  # images per model call
    max_wait_ms: float = 10.0  # longest a request waits for companions before its batch runs
    queue: int = 64  # requests that may wait; beyond that, 503
    max_upload_mb: float = 32.0  # per upload; checked while streaming
    max_new_tokens: int | None = None  # decoding length; None: the detector's default
    api_key: str | None = None  # when set, /v1/* needs it (X-API-Key or Authorization: Bearer)
    upload_timeout_s: float = 60.0  # a client that trickles its upload longer than this gets 408

    def __post_init__(self) -> None:
        checks = {
            "max_batch": self.max_batch >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "queue": self.queue >= 1,
            "max_upload_mb": self.max_upload_mb > 0,
            "max_new_tokens": self.max_new_tokens is None or self.max_new_tokens >= 1,
            "upload_timeout_s": self.upload_timeout_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"serve: {name} is out of range: {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def __repr__(self) -> str:  # the key must never reach a log line through a repr
        shown = "set" if self.api_key else None
        return (
            f"ServeConfig(max_batch={self.max_batch}, max_wait_ms={self.max_wait_ms}, queue={self.queue}, "
            f"max_upload_mb={self.max_upload_mb}, max_new_tokens={self.max_new_tokens}, "
            f"upload_timeout_s={self.upload_timeout_s}, api_key={shown})"
        )


@dataclass(config=SETTINGS_CONFIG)
class ServeSettings(DecodeSettings):
    """Serve one model over HTTP (``serve``); the API key comes from the environment."""

    model: Annotated[StrList, flag("--model", metavar="M", append=True, required=True)] = field(
        default_factory=list
    )
    """Checkpoint: HF folder, big_vision .npz, run folder, or a model name: Hugging Face Hub
    id (google/paligemma2-3b-pt-224) or Kaggle handle
    (kaggle:google/paligemma/jax/paligemma-3b-pt-224)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port."""
    max_batch: Annotated[int, flag(metavar="B")] = 8
    """Most images per model call (1 turns batching off)."""
    max_wait_ms: Annotated[Float, flag(metavar="MS")] = 10.0
    """Longest a request waits for others to share its model call."""
    queue: Annotated[int, flag(metavar="N")] = 64
    """Requests that may wait for the model; more get 503."""
    max_upload_mb: Annotated[Float, flag(metavar="MB")] = 32.0
    """Largest upload accepted, checked while it arrives."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Server log level."""

    @model_validator(mode="after")
    def _serves(self) -> ServeSettings:
        if len(self.model) > 1:
            raise ConfigError(f"serve takes one --model, got {len(self.model)}")
        self.app_config()  # the app's limits, checked now
        return self

    def app_config(self, api_key: str | None = None) -> ServeConfig:
        """The running app's configuration, with ``api_key`` (see :func:`api_key_from_env`)."""
        return ServeConfig(
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            queue=self.queue,
            max_upload_mb=self.max_upload_mb,
            max_new_tokens=self.max_new_tokens,
            api_key=api_key,
        )
