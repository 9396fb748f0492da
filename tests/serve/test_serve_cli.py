"""``paligemma-xray serve`` as a user runs it: a subprocess on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import xray_png

from paligemma_xray.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_verb_with_api_key(tiny_boxes_hf_dir, tmp_path):
    port, secret = _free_port(), "cli-secret-value"
    env = {**os.environ, "PALIGEMMA_XRAY_API_KEY": secret, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "paligemma_xray.cli",
        "serve",
        "--model",
        str(tiny_boxes_hf_dir),
        "--port",
        str(port),
        "--max-batch",
        "4",
        "--max-upload-mb",
        "1",
        "--device",
        "cpu",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            time.sleep(0.2)
        files = {"file": ("a.png", xray_png(), "image/png")}
        assert httpx.post(f"{url}/v1/detect", files=files, timeout=60).status_code == 401
        response = httpx.post(f"{url}/v1/detect", files=files, headers={"X-API-Key": secret}, timeout=60)
        assert response.status_code == 200 and response.json()["count"] == 2
        model = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {secret}"}).json()
        assert model["limits"]["max_upload_bytes"] == 1024 * 1024 and model["batching"]["max_batch"] == 4
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = log_path.read_text()
    assert "POST /v1/detect" in output  # the access log is on ...
    assert secret not in output  # ... and the key is never in it


@pytest.mark.parametrize("flag", [["--max-batch", "0"], ["--queue", "0"], ["--max-upload-mb", "0"]])
def test_serve_verb_refuses_bad_settings_before_loading(flag, capsys):
    assert main(["serve", "--model", "/nonexistent", *flag]) == 2
    assert "out of range" in capsys.readouterr().err


def test_serve_verb_refuses_an_address_it_cannot_listen_on_before_loading(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 2
        assert "Address already in use" in capsys.readouterr().err  # was: model load, then exit 3
    assert main(["serve", "--model", "/nonexistent", "--port", "70000"]) == 2  # was a traceback
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
