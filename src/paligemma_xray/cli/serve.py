"""``paligemma-xray serve``: a model over HTTP (JSON API and a browser page)."""

from __future__ import annotations

from typing import Any

from paligemma_xray.cli.parser import verb
from paligemma_xray.serve.settings import ServeSettings, api_key_from_env

EXAMPLES = ["PALIGEMMA_XRAY_API_KEY=secret paligemma-xray serve --model runs/r1 --port 8000"]


def serve(settings: ServeSettings) -> int:
    from paligemma_xray.serve.server import serve

    serve(settings, api_key=api_key_from_env())
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "serve",
        serve,
        help="serve a model over HTTP: JSON API and a browser page",
        description="Serve MODEL on http://HOST:PORT: the page at / (drop an X-ray, see boxes,\n"
        "move a threshold), POST /v1/detect (multipart 'file': image or DICOM; optional\n"
        "'prompt', 'threshold'), GET /v1/model, GET /healthz, OpenAPI at /docs.\n"
        "Concurrent requests share model calls (up to --max-batch images, waiting at\n"
        "most --max-wait-ms for companions); past --queue waiting: 503 + Retry-After.\n"
        "API key: set PALIGEMMA_XRAY_API_KEY to require it (X-API-Key or Authorization:\n"
        "Bearer) on /v1/*; it is never printed or logged. Uploads stay in memory.",
        examples=EXAMPLES,
        settings=ServeSettings,
    )
