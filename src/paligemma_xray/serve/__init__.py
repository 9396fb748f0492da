"""HTTP service: a FastAPI app with dynamic batching, a browser page, and a runner.

``serve(model, host=…, port=…, config=ServeConfig(…))`` loads a detector and serves it;
``create_app(detector, config)`` builds the app around any object with the
:class:`~paligemma_xray.infer.Detector` ``detect``/``model_id`` interface;
``ServerThread(app)`` runs it on a loopback port in the background (tests, benchmarks).
"""

from paligemma_xray.serve.app import API_KEY_ENV, DEFAULT_PROMPT, ServeConfig, api_key_from_env, create_app
from paligemma_xray.serve.batching import BatchInfo, BatchingQueue, QueueClosedError, QueueFullError
from paligemma_xray.serve.server import ServerThread, serve

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_PROMPT",
    "BatchInfo",
    "BatchingQueue",
    "QueueClosedError",
    "QueueFullError",
    "ServeConfig",
    "ServerThread",
    "api_key_from_env",
    "create_app",
    "serve",
]
