"""The service with a calibrated model: saved operating point in /v1/model, probabilities per box."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import FakeDetector, xray_png

from paligemma_xray.infer.calibrated import Calibration, ScoreMap
from paligemma_xray.serve import ServeConfig, ServerThread, create_app


def test_calibrated_model_reports_probabilities_and_its_operating_point(fake_server):
    detector = FakeDetector()  # boxes scored 0.9 and 0.2
    box = ScoreMap("platt", {"coef": 2.0, "intercept": 0.5}, 100, 40)
    detector.calibration = Calibration(box, box, 0.0872, "sensitivity=0.9", 0.1, "platt")
    with ServerThread(create_app(detector, ServeConfig(max_wait_ms=1))) as server:
        info = httpx.get(f"{server.url}/v1/model", timeout=60).json()
        assert (info["threshold"], info["operating_point"], info["calibrated"]) == (
            0.0872,
            "sensitivity=0.9",
            True,
        )
        body = httpx.post(
            f"{server.url}/v1/detect", files={"file": ("x.png", xray_png(), "image/png")}, timeout=60
        ).json()
    probabilities = [d["probability"] for d in body["detections"]]
    assert probabilities == pytest.approx(box([0.9, 0.2]).tolist(), abs=1e-5)
    assert probabilities[0] > probabilities[1]
    assert body["image_probability"] == pytest.approx(float(box([0.9])[0]), abs=1e-5)
    assert body["operating_threshold"] == 0.0872
    # Without a calibration nothing is invented: the fields are null.
    plain = httpx.post(
        f"{fake_server.url}/v1/detect", files={"file": ("x.png", xray_png(), "image/png")}
    ).json()
    assert plain["image_probability"] is None and plain["detections"][0]["probability"] is None
    assert httpx.get(f"{fake_server.url}/v1/model", timeout=60).json()["threshold"] is None
