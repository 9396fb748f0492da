"""Fixtures for the service tests: live servers.

Servers are real uvicorn servers on 127.0.0.1 (a free port bound by the fixture), run in a
thread and stopped when the module's tests are done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from serve_helpers import FakeDetector

from paligemma_xray.serve import ServeConfig, ServerThread, create_app


@pytest.fixture(scope="module")
def fake_detector() -> FakeDetector:
    return FakeDetector()


@pytest.fixture(scope="module")
def fake_server(fake_detector) -> Iterator[ServerThread]:
    """A live server around the fake detector, 1 MiB upload limit, no API key."""
    app = create_app(fake_detector, ServeConfig(max_batch=4, max_wait_ms=5, queue=16, max_upload_mb=1))
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def live_server(tiny_boxes_hf_dir) -> Iterator[ServerThread]:
    """A live server around the real Detector and the tiny two-box model, 2 MiB uploads."""
    from paligemma_xray.infer import Detector

    detector = Detector.load(tiny_boxes_hf_dir, device="cpu")
    config = ServeConfig(max_batch=8, max_wait_ms=20, queue=64, max_upload_mb=2)
    with ServerThread(create_app(detector, config)) as server:
        yield server
