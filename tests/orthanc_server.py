"""A real Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the tests.

Each instance gets a free loopback port, its own storage folder and configuration (DICOM
port off, remote access off, one test user), and can be stopped and started again on the
same storage (to test a PACS that goes down mid-run).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER, PASSWORD = "radiology", "test-password-not-secret"


def _plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for candidate in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []:
            return candidate
    return None


def require_orthanc() -> Path:
    """The DICOMweb plugin's path, or skip the test saying what is missing."""
    if not Path(ORTHANC).is_file():
        pytest.skip(
            "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; `make test` does it as root)"
        )
    plugin = _plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return plugin


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    """One Orthanc process; ``url`` is its DICOMweb root."""

    def __init__(self, root: Path) -> None:
        plugin = require_orthanc()
        self.root = root
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "paligemma-xray-test",
                    "StorageDirectory": str(root / "db"),
                    "IndexDirectory": str(root / "db"),
                    "HttpPort": self.port,
                    "DicomServerEnabled": False,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": True,
                    "RegisteredUsers": {USER: PASSWORD},
                    "Plugins": [str(plugin)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.port}"},
                    "StableAge": 1,
                }
            )
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/dicom-web"
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc exited at start:\n{tail}")
            try:
                if requests.get(f"{self.base}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def count(self, what: str = "instances") -> int:
        """How many patients/studies/series/instances Orthanc holds (its REST API)."""
        return len(requests.get(f"{self.base}/{what}", auth=(USER, PASSWORD), timeout=10).json())

    def upload(self, paths) -> None:
        for path in paths:
            answer = requests.post(
                f"{self.base}/instances", data=Path(path).read_bytes(), auth=(USER, PASSWORD), timeout=30
            )
            answer.raise_for_status()
