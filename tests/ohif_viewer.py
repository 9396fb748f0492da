"""OHIF (the viewer OHIF publishes on npm as ``@ohif/app``) served offline for the browser tests.

The npm package carries a prebuilt single-page app in ``package/dist``. ``OhifServer``
serves it from one loopback origin together with a reverse proxy of a test Orthanc's
``/dicom-web`` (so the browser needs neither CORS nor Orthanc's password) and its own
``app-config.js`` pointing OHIF's DICOMweb data source at that proxy.

The package is fetched once with ``npm pack`` into ``.cache/ohif/`` (``make ohif``);
:func:`require_ohif` skips a test, saying why, where npm or the registry is unavailable.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

VERSION = "3.13.2"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "ohif"
TARBALL = CACHE / f"ohif-app-{VERSION}.tgz"
DIST = CACHE / VERSION / "package" / "dist"

# The app-config.js the tests serve: one DICOMweb source, the proxy on the same origin.
APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: %s,
    },
  ],
};
"""


def fetch_package(cache: Path = CACHE) -> Path | None:
    """The unpacked ``dist`` folder of ``@ohif/app`` (``npm pack`` on first use); ``None`` if npm fails."""
    dist = cache / VERSION / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    tarball = cache / f"ohif-app-{VERSION}.tgz"
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            return None
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "pack", f"@ohif/app@{VERSION}", "--pack-destination", str(cache)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or not tarball.is_file():
            return None
    partial = cache / f"{VERSION}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    partial.rename(cache / VERSION)
    return dist


def require_ohif() -> Path:
    """OHIF's ``dist`` folder, or skip the test saying what is missing."""
    try:
        dist = fetch_package()
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as error:
        pytest.skip(f"the OHIF package (@ohif/app@{VERSION}) could not be fetched: {error}")
    if dist is None:
        pytest.skip(
            f"the OHIF package (@ohif/app@{VERSION}) is not in {CACHE} and npm could not fetch it "
            "(no npm or no registry; `make ohif` fetches it)"
        )
    return dist


class OhifServer:
    """OHIF's static files plus ``/dicom-web`` proxied to ``orthanc`` (with its credentials)."""

    def __init__(self, dist: Path, dicomweb_url: str, auth: tuple[str, str]) -> None:
        self.dist = dist
        self.upstream = dicomweb_url.rstrip("/")
        self.auth = auth
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def app_config(self) -> str:
        root = f"{self.url}/dicom-web"
        configuration = {
            "friendlyName": "test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": root,
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        }
        return APP_CONFIG % json.dumps(configuration, indent=2)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(server.dist), **kwargs)

            def log_message(self, format, *args) -> None:  # quiet test output
                return

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                target = server.upstream + self.path[len("/dicom-web") :]
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
                body = None
                if self.command == "POST":
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = requests.request(
                    self.command, target, headers=headers, data=body, auth=server.auth, timeout=60
                )
                self._send(answer.status_code, answer.content, answer.headers.get("Content-Type", ""))

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path.startswith("/dicom-web/") or path == "/dicom-web":
                    self._proxy()
                    return
                if path == "/app-config.js":
                    self._send(200, server.app_config().encode(), "application/javascript")
                    return
                if path in ("/sw.js", "/init-service-worker.js"):  # no service worker in tests
                    self._send(200, b"", "application/javascript")
                    return
                if not (server.dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"  # the single-page app's routes (/viewer, …)
                super().do_GET()

            def do_POST(self) -> None:
                self._proxy()

        return Handler

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
