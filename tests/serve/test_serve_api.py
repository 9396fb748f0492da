"""The HTTP contract on a live loopback server: status codes, limits, auth, the queue.

A fake detector with a fixed answer stands in for the model here (the end-to-end tests
with the real Detector are in test_serve_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import tempfile
import threading

import httpx
import pytest
from serve_helpers import FakeDetector, bad_corpus, dicom_bytes, xray_png

from paligemma_xray.serve import ServeConfig, ServerThread, create_app
from paligemma_xray.serve.uploads import sniff_kind


def post_image(url: str, data: bytes, filename: str = "x.png", content_type: str = "image/png", **fields):
    return httpx.post(
        f"{url}/v1/detect", files={"file": (filename, data, content_type)}, data=fields, timeout=30
    )


def test_health_model_and_openapi(fake_server):
    health = httpx.get(f"{fake_server.url}/healthz").json()
    assert health["status"] == "ok" and health["model_id"] == "fake-detector"
    assert {"model_calls", "requests", "queue_depth", "max_batch"} <= set(health["batching"])
    model = httpx.get(f"{fake_server.url}/v1/model").json()
    assert model["model_id"] == "fake-detector"
    assert model["limits"]["max_upload_bytes"] == 1024 * 1024
    schema = httpx.get(f"{fake_server.url}/openapi.json").json()
    assert {"/v1/detect", "/v1/model", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["file"]
    assert "413" in schema["paths"]["/v1/detect"]["post"]["responses"]


def test_detect_returns_pixel_boxes_scores_and_timing(fake_server):
    response = post_image(fake_server.url, xray_png(200, 100), filename="knee.png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == "fake-detector" and body["prompt"] == "detect fracture"
    assert body["image"] == {"width": 200, "height": 100, "filename": "knee.png", "kind": "png"}
    assert body["count"] == 2
    first = body["detections"][0]
    # The fake answers (10, 20, 40, 60) on a 100×100 grid: scaled to 200×100 pixels.
    assert first["box"] == pytest.approx([20, 20, 80, 60], abs=0.5)
    assert first["label"] == "fracture" and first["class_id"] == 0 and first["score"] == pytest.approx(0.9)
    timing = body["timing"]
    assert timing["batch_size"] >= 1 and timing["total_ms"] >= timing["model_ms"] > 0
    assert body["preview"] is None


def test_threshold_and_prompt_fields(fake_server, fake_detector):
    body = post_image(fake_server.url, xray_png(), threshold="0.5", prompt="detect fracture ; cast").json()
    assert body["threshold"] == 0.5 and body["prompt"] == "detect fracture ; cast"
    assert fake_detector.prompts[-1] == "detect fracture ; cast"  # the model got it, not only the reply
    assert [d["score"] for d in body["detections"]] == [pytest.approx(0.9)]
    body = post_image(fake_server.url, xray_png(), prompt="detect cast ; fracture").json()
    assert [d["label"] for d in body["detections"]] == ["cast", "fracture"]


def test_preview_is_a_data_url_of_the_decoded_image(fake_server):
    body = post_image(
        fake_server.url, dicom_bytes(with_pixels=True), "chest.dcm", "application/dicom", preview="true"
    ).json()
    assert body["image"]["kind"] == "dicom" and (body["image"]["width"], body["image"]["height"]) == (64, 80)
    assert body["preview"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("name", sorted(bad_corpus()))
def test_bad_uploads_get_a_clear_4xx(fake_server, name):
    data, filename, content_type, expected = bad_corpus()[name]
    response = post_image(fake_server.url, data, filename, content_type)
    assert response.status_code == expected, response.text
    body = response.json()
    assert body["error"] and len(body["detail"]) > 10


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        (
            {"content": b'{"image": "x"}', "headers": {"content-type": "application/json"}},
            415,
            "unsupported_media_type",
        ),
        ({"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_form"),
        (
            {
                "content": b"--xyz\r\ngarbage",
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
            400,
            "bad_form",
        ),
        (
            {"data": {"prompt": "detect fracture"}, "files": {"other": ("a.png", b"x", "image/png")}},
            422,
            "missing_file",
        ),
        (
            {"data": {"threshold": "high"}, "files": {"file": ("a.png", xray_png(), "image/png")}},
            422,
            "bad_field",
        ),
        (
            {"data": {"threshold": "1.5"}, "files": {"file": ("a.png", xray_png(), "image/png")}},
            422,
            "bad_field",
        ),
        (
            {
                "data": {"prompt": "detect fracture\nfracture"},
                "files": {"file": ("a.png", xray_png(), "image/png")},
            },
            422,
            "bad_field",
        ),
        (
            {"data": {"prompt": "x" * 300}, "files": {"file": ("a.png", xray_png(), "image/png")}},
            422,
            "bad_field",
        ),
    ],
    ids=[
        "json",
        "no-boundary",
        "broken-multipart",
        "no-file-part",
        "threshold-text",
        "threshold-range",
        "prompt-newline",
        "prompt-long",
    ],
)
def test_malformed_requests(fake_server, kwargs, status, error):
    response = httpx.post(f"{fake_server.url}/v1/detect", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


def test_unknown_route_and_method_are_json_4xx(fake_server):
    assert httpx.get(f"{fake_server.url}/nope").status_code == 404
    response = httpx.get(f"{fake_server.url}/v1/detect")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


def test_too_large_upload_is_refused_while_streaming(fake_server):
    big = xray_png() + b"\x00" * (2 * 1024 * 1024)
    response = post_image(fake_server.url, big)  # Content-Length declared: refused before reading
    assert response.status_code == 413 and response.json()["error"] == "too_large"

    # Without Content-Length (chunked), the limit applies to the bytes as they arrive: send
    # 1.25 MiB of a never-finished body; the 413 must come while the body is still open.
    with socket.create_connection((fake_server.host, fake_server.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
        )
        head = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        conn.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"\x00" * (64 * 1024)
        for _ in range(20):
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = conn.recv(4096)  # no closing chunk was sent: only a streaming check answers
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert httpx.get(f"{fake_server.url}/healthz").status_code == 200


def test_huge_declared_size_is_answered_at_once(fake_server):
    # A raw request announcing 10 GB: the answer must come without the body being sent.
    with socket.create_connection((fake_server.host, fake_server.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 10000000000\r\n\r\n--abc\r\n"
        )
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")


def test_uploads_never_touch_the_disk(fake_server, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    # Just under the 1 MiB limit: Starlette's own form parser would spool this to disk.
    data = xray_png(400, 400, fmt="BMP")
    data += b"\x00" * (1000 * 1024 - len(data))
    response = post_image(fake_server.url, data, "big.bmp", "image/bmp")
    assert response.status_code == 200, response.text
    assert response.json()["image"]["width"] == 400


def test_api_key_from_config(monkeypatch, caplog):
    secret = "s3cret-key-for-tests"
    app = create_app(FakeDetector(), ServeConfig(api_key=secret))
    with caplog.at_level(logging.DEBUG), ServerThread(app, log_level="debug") as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # health checks need no key
        assert httpx.get(f"{server.url}/").status_code == 200  # the page asks for the key itself
        refused = httpx.get(f"{server.url}/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": secret}).status_code == 200
        bearer = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/v1/model", headers=bearer).status_code == 200
        assert post_image(server.url, xray_png()).status_code == 401
        files = {"file": ("a.png", xray_png(), "image/png")}
        ok = httpx.post(f"{server.url}/v1/detect", files=files, headers=bearer, timeout=30)
        assert ok.status_code == 200
    assert secret not in caplog.text
    assert secret not in repr(app.state.config)


class BlockingDetector(FakeDetector):
    """Holds every model call until released, so that the queue fills up."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def detect(self, images, prompt="detect fracture", **kwargs):
        self.entered.set()
        self.release.wait(20)
        return super().detect(images, prompt, **kwargs)


def test_full_queue_answers_503_with_retry_after():
    detector = BlockingDetector()
    app = create_app(detector, ServeConfig(max_batch=1, max_wait_ms=0, queue=2))
    png = xray_png()

    async def flood(url: str):
        async with httpx.AsyncClient(timeout=30) as client:

            async def one():
                return await client.post(f"{url}/v1/detect", files={"file": ("a.png", png, "image/png")})

            first = asyncio.create_task(one())
            while not detector.entered.is_set():  # one request inside the model
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(one()) for _ in range(6)]
            for _ in range(1000):  # bounded: at most ~10 s
                if (await client.get(f"{url}/healthz")).json()["batching"]["rejected_full"] >= 4:
                    break
                await asyncio.sleep(0.01)
            detector.release.set()
            return await asyncio.gather(first, *rest)

    with ServerThread(app) as server:
        try:
            responses = asyncio.run(flood(server.url))
        finally:
            detector.release.set()
        health = httpx.get(f"{server.url}/healthz").json()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 503, 503, 503, 503]  # 1 in the model + 2 queued; 4 refused
    busy = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
    assert busy[0].json()["error"] == "busy"
    assert health["batching"]["rejected_full"] == 4


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "kind"),
    [
        (b"\xff\xd8\xff\xe0rest", None, None, "jpeg"),
        (b"\x89PNG\r\n\x1a\nrest", None, None, "png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", None, None, "webp"),
        (b"\x00" * 128 + b"DICMrest", None, None, "dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00", "old.dcm", None, "dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00", "old.bin", "application/dicom", "dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00", "old.bin", None, None),
        (b"plain text", "a.png", "image/png", None),
    ],
)
def test_sniff_kind(data, filename, content_type, kind):
    assert sniff_kind(data, filename, content_type) == kind


def test_page_is_one_self_contained_file(fake_server):
    response = httpx.get(f"{fake_server.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", page), "external asset in the page"
    for element in ('id="file"', 'id="threshold"', "<canvas", 'id="box-count"', "<script>", "<style>"):
        assert element in page
    assert 'id="prompt" type="text" value="detect fracture"' in page  # locations.DEFAULT_PROMPT


def test_stalled_upload_gets_408():
    app = create_app(FakeDetector(), ServeConfig(upload_timeout_s=0.5))
    with (
        ServerThread(app) as server,
        socket.create_connection((server.host, server.port), timeout=10) as conn,
    ):
        conn.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n"
            b"Content-Type: multipart/form-data; boundary=abc\r\n\r\n--abc\r\n"
        )
        reply = conn.recv(4096)  # the rest of the body never comes
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


# --- issue 17: limits in words, one file, JSON for every error, nothing secret shown --------


def test_long_prompt_limit_is_stated_in_bytes(fake_server):
    response = post_image(fake_server.url, xray_png(), prompt="detect " + "x" * 5000)
    assert response.status_code == 413
    assert "4,096 bytes" in response.json()["detail"]  # used to say "the limit of 0.0 MiB"


def test_a_second_file_part_is_refused(fake_server):
    files = [("file", ("a.png", xray_png(), "image/png")), ("file", ("b.png", xray_png(50, 40), "image/png"))]
    response = httpx.post(f"{fake_server.url}/v1/detect", files=files, timeout=30)
    assert response.status_code == 400 and response.json()["error"] == "bad_form"  # was: b.png ignored


def test_requests_the_http_parser_refuses_get_a_json_error(fake_server):
    """Malformed or oversized request lines and headers never reach the app: uvicorn answered
    them in plain text; clients of a JSON API get ``{"error", "detail"}`` here too."""
    with socket.create_connection((fake_server.host, fake_server.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_request"


def test_a_key_in_the_query_string_never_reaches_the_access_log():
    secret = "query-secret-123"
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    app = create_app(FakeDetector(), ServeConfig(api_key="the-real-key"))
    with ServerThread(app, log_level="info") as server:
        handler = Keep()
        logging.getLogger("uvicorn.access").addHandler(handler)
        try:
            assert httpx.get(f"{server.url}/v1/model?api_key={secret}&x=1").status_code == 401
        finally:
            logging.getLogger("uvicorn.access").removeHandler(handler)
    assert any("/v1/model?api_key=***&x=1" in line for line in records), records
    assert not any(secret in line for line in records)


def test_health_shows_the_model_name_not_its_path_and_docs_work_offline():
    detector = FakeDetector()
    detector.model_id = "/srv/models/runs/r1"
    with ServerThread(create_app(detector, ServeConfig())) as server:
        assert httpx.get(f"{server.url}/healthz").json()["model_id"] == "r1"
        docs = httpx.get(f"{server.url}/docs").text
        assert "cdn." not in docs  # the page used to load Swagger UI from a CDN: blank offline
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs)
        assert assets and all(httpx.get(server.url + asset).status_code == 200 for asset in assets)


def test_a_malformed_multipart_body_leaves_no_stray_parser_line(fake_server, caplog):
    part = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nxx\r\n'
    body = b"--other\r\n" + part + b"--other--\r\n"
    with caplog.at_level(logging.DEBUG):
        response = httpx.post(
            f"{fake_server.url}/v1/detect",
            content=body,
            headers={"content-type": "multipart/form-data; boundary=expected"},
            timeout=30,
        )
    assert response.status_code == 400 and response.json()["error"] == "bad_form"
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]  # "Expected boundary …"


def test_the_pages_prompt_field_holds_the_apps_default_prompt(monkeypatch):
    from paligemma_xray import locations
    from paligemma_xray.serve import app as app_module

    assert app_module.DEFAULT_PROMPT is locations.DEFAULT_PROMPT  # one constant, not a copy
    monkeypatch.setattr(app_module, "DEFAULT_PROMPT", "detect fracture ; <cast>")
    with ServerThread(create_app(FakeDetector())) as server:
        page = httpx.get(f"{server.url}/").text
    assert '<input id="prompt" type="text" value="detect fracture ; &lt;cast&gt;"' in page


def test_detect_query_parameters_are_honoured_or_refused_and_documented(fake_server, fake_detector):
    url = f"{fake_server.url}/v1/detect"
    files = {"file": ("x.png", xray_png(), "image/png")}
    # ?threshold= used to be ignored silently (the form field worked): now the same as the field.
    body = httpx.post(f"{url}?threshold=0.99", files=files, timeout=30).json()
    assert body["threshold"] == 0.99 and body["detections"] == []
    body = httpx.post(f"{url}?threshold=0.5&prompt=detect%20cast", files=files, timeout=30).json()
    assert body["threshold"] == 0.5 and fake_detector.prompts[-1] == "detect cast"
    # Both ways with the same value: fine; with different values: refused.
    assert (
        httpx.post(f"{url}?threshold=0.5", files=files, data={"threshold": "0.5"}, timeout=30).status_code
        == 200
    )
    clash = httpx.post(f"{url}?threshold=0.99", files=files, data={"threshold": "0.5"}, timeout=30)
    assert clash.status_code == 422 and "threshold given twice" in clash.json()["detail"]
    # An unknown query parameter (a typo) is refused, not ignored.
    typo = httpx.post(f"{url}?treshold=0.99", files=files, timeout=30)
    assert typo.status_code == 422 and "'treshold'" in typo.json()["detail"]
    assert httpx.post(f"{url}?threshold=2", files=files, timeout=30).status_code == 422
    schema = httpx.get(f"{fake_server.url}/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/v1/detect"]["post"]["parameters"]}
    assert set(params) == {"format", "prompt", "threshold", "preview"}
    assert all(p["in"] == "query" for p in params.values())
    assert params["threshold"]["schema"]["maximum"] == 1
