"""End to end: the real Detector with a tiny model behind a live uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image
from serve_helpers import bad_corpus, dicom_bytes, xray_png

pytestmark = pytest.mark.slow

CLIENTS = 32
REQUESTS_PER_CLIENT = 3


def test_detect_with_the_real_detector(live_server, tiny_boxes_hf_dir, tiny_boxes):
    response = httpx.post(
        f"{live_server.url}/v1/detect",
        files={"file": ("hand.png", xray_png(200, 150), "image/png")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == str(tiny_boxes_hf_dir)
    assert body["image"]["width"] == 200 and body["image"]["height"] == 150
    assert body["count"] == 2 == len(body["detections"])
    for found, (x1, y1, x2, y2) in zip(body["detections"], tiny_boxes):
        # Pixels of the uploaded image, within one location bin of what the model was taught.
        assert found["box"] == pytest.approx([x1 * 200, y1 * 150, x2 * 200, y2 * 150], abs=1.0)
        assert found["label"] == "fracture" and found["class_id"] == 0
        assert 0.0 < found["score"] <= 1.0
    assert body["timing"]["model_ms"] > 0 and body["timing"]["batch_size"] >= 1

    # The threshold drops the lower-scored box on the server side too.
    low, high = sorted(d["score"] for d in body["detections"])
    middle = (low + high) / 2
    filtered = httpx.post(
        f"{live_server.url}/v1/detect",
        files={"file": ("hand.png", xray_png(200, 150), "image/png")},
        data={"threshold": f"{middle:.6f}"},
        timeout=60,
    ).json()
    assert [d["score"] for d in filtered["detections"]] == [pytest.approx(high, abs=1e-4)]


def test_jpeg_and_dicom_uploads(live_server):
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(xray_png(120, 90))).save(jpeg, format="JPEG")
    for data, name, kind, size in [
        (jpeg.getvalue(), "a.jpg", "jpeg", (120, 90)),
        (dicom_bytes(with_pixels=True, width=64, height=80), "b.dcm", "dicom", (64, 80)),
    ]:
        body = httpx.post(
            f"{live_server.url}/v1/detect",
            files={"file": (name, data, "application/octet-stream")},
            timeout=60,
        ).json()
        assert body["image"]["kind"] == kind and (body["image"]["width"], body["image"]["height"]) == size
        assert body["count"] == 2


def test_concurrent_clients_are_batched(live_server):
    """32 clients × 3 requests at once: no errors, and fewer model calls than requests."""
    images = [xray_png(96 + i, 128, seed=i) for i in range(CLIENTS)]
    before = httpx.get(f"{live_server.url}/healthz").json()["batching"]

    async def client(http: httpx.AsyncClient, index: int) -> list[int]:
        codes = []
        for _ in range(REQUESTS_PER_CLIENT):
            files = {"file": (f"c{index}.png", images[index], "image/png")}
            response = await http.post(f"{live_server.url}/v1/detect", files=files)
            codes.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["count"] == 2
        return codes

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            results = await asyncio.wait_for(
                asyncio.gather(*(client(http, i) for i in range(CLIENTS))), timeout=120
            )
        return [code for codes in results for code in codes]

    started = time.perf_counter()
    codes = asyncio.run(main())
    elapsed = time.perf_counter() - started
    after = httpx.get(f"{live_server.url}/healthz").json()["batching"]
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert codes == [200] * total
    calls = after["model_calls"] - before["model_calls"]
    images_done = after["images"] - before["images"]
    assert images_done == total
    assert calls < total, f"no batching: {calls} model calls for {total} requests"
    assert max(int(size) for size in after["batch_sizes"]) > 1
    print(f"\n{total} requests in {elapsed:.2f} s: {calls} model calls, mean batch {total / calls:.2f}")


def test_bad_corpus_gives_4xx_and_the_server_stays_healthy(live_server):
    for name, (data, filename, content_type, expected) in bad_corpus().items():
        response = httpx.post(
            f"{live_server.url}/v1/detect", files={"file": (filename, data, content_type)}, timeout=60
        )
        assert response.status_code == expected, f"{name}: {response.status_code} {response.text}"
        assert 400 <= response.status_code < 500
    too_big = xray_png() + b"\x00" * (3 * 1024 * 1024)
    response = httpx.post(
        f"{live_server.url}/v1/detect", files={"file": ("big.png", too_big, "image/png")}, timeout=60
    )
    assert response.status_code == 413
    assert httpx.get(f"{live_server.url}/healthz").json()["status"] == "ok"
    good = httpx.post(
        f"{live_server.url}/v1/detect", files={"file": ("ok.png", xray_png(), "image/png")}, timeout=60
    )
    assert good.status_code == 200 and good.json()["count"] == 2
