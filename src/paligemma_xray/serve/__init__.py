"""HTTP service: a FastAPI app with dynamic batching, a browser page, and a runner.

``serve(ServeSettings(model=[…], port=…), api_key=…)`` loads a detector and serves it;
``create_app(detector, config)`` builds the app around any object with the
:class:`~paligemma_xray.infer.Detector` ``detect``/``model_id`` interface;
``ServerThread(app)`` runs it on a loopback port in the background (tests, benchmarks).
The app and the server (FastAPI, uvicorn) are imported on first use, so that the settings
(:mod:`paligemma_xray.serve.settings`, what the command line's parser is built from) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paligemma_xray.locations import DEFAULT_PROMPT
from paligemma_xray.serve.settings import API_KEY_ENV, ServeConfig, ServeSettings, api_key_from_env

if TYPE_CHECKING:
    from paligemma_xray.serve.app import create_app
    from paligemma_xray.serve.batching import BatchInfo, BatchingQueue, QueueClosedError, QueueFullError
    from paligemma_xray.serve.server import ServerThread, serve

_WHERE = {
    "create_app": "app",
    "BatchInfo": "batching",
    "BatchingQueue": "batching",
    "QueueClosedError": "batching",
    "QueueFullError": "batching",
    "ServerThread": "server",
    "serve": "server",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"paligemma_xray.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paligemma_xray.serve' has no attribute {name!r}")


__all__ = [
    "API_KEY_ENV",
    "DEFAULT_PROMPT",
    "BatchInfo",
    "BatchingQueue",
    "QueueClosedError",
    "QueueFullError",
    "ServeConfig",
    "ServeSettings",
    "ServerThread",
    "api_key_from_env",
    "create_app",
    "serve",
]
