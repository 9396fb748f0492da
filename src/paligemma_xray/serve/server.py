"""Running the app: in the foreground (the ``serve`` verb) or in a background thread.

The background form (:class:`ServerThread`) is what tests and the benchmark use: a real
uvicorn server on a loopback socket bound before the thread starts, so the port is known
and free with no race.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from paligemma_xray.errors import ConfigError
from paligemma_xray.serve.app import create_app
from paligemma_xray.serve.settings import API_KEY_ENV, ServeSettings

log = logging.getLogger(__name__)


def serve(settings: ServeSettings, *, api_key: str | None = None) -> None:
    """Load the detector ``settings`` describe and serve it on ``host:port`` until interrupted.

    ``api_key`` (see :func:`~paligemma_xray.serve.settings.api_key_from_env`): when set,
    ``/v1/*`` requires it. The address is checked before the (long) model load.
    """
    from paligemma_xray.infer import Detector  # torch and the model load only when serving

    config = settings.app_config(api_key)
    host, port = settings.host, settings.port
    check_address(host, port)  # before the (long) model load
    detector = Detector.load(
        settings.model[0],
        batch_size=config.max_batch,
        mask_decoder=settings.load_mask_decoder(),
        **settings.load_options(),
    )
    app = create_app(detector, config)
    if not config.api_key and not _is_loopback(host):
        log.warning("serving on %s without an API key: set %s to require one", host, API_KEY_ENV)
    # Access logs carry the request line only, never headers; a key sent in the query string
    # (refused: only headers are read) is masked in it.
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        http=JsonErrorsH11,
    )
    redact_access_log()
    uvicorn.Server(server_config).run()


# Query parameters that may carry a secret; their values never reach the access log.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:api[_-]?key|apikey|key|token|access_token|auth|password)=)[^&\s\"]*")


class _RedactSecrets(logging.Filter):
    """Masks ``?api_key=…`` (and the like) in uvicorn's access-log request line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_QUERY.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _SECRET_QUERY.sub(r"\1***", record.msg)
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (after uvicorn configured its logging)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactSecrets) for f in logger.filters):
        logger.addFilter(_RedactSecrets())


class JsonErrorsH11(H11Protocol):
    """uvicorn's h11 protocol, answering unparsable requests with the service's JSON 4xx.

    A request line or headers h11 cannot accept (malformed, or headers larger than its
    limit) never reach the app; uvicorn then answers plain text. Clients of a JSON API
    expect ``{"error", "detail"}`` on every error.
    """

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            {"error": "bad_request", "detail": f"{msg} (malformed or oversized request line or headers)"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        self.transport.write(self.conn.send(response))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def check_address(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless a server could listen on ``host:port`` now."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ServerThread:
    """A uvicorn server for ``app`` in a daemon thread, on ``host`` and a free port.

    ``with ServerThread(app) as server: httpx.get(server.url + "/healthz")``
    """

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        **uvicorn_kwargs: Any,
    ):
        self.app = app
        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port: int = self._socket.getsockname()[1]
        uvicorn_kwargs.setdefault("http", JsonErrorsH11)
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", **uvicorn_kwargs)
        redact_access_log()
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        except BaseException as error:  # reported to the starting thread by start()
            self._error = error

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the server did not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
