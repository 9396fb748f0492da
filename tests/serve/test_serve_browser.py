"""The page in headless Chromium (Debian's, driven by Playwright): upload, boxes, slider.

Skipped, with the reason, where the system Chromium is not installed (``make browser``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
from chromium import CHROMIUM, FLAGS
from serve_helpers import dicom_bytes, xray_png

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="the system Chromium is not installed (apt-get install chromium, or `make browser`)",
    ),
]

# Reads the canvas around the left edge of a box: is the box colour (#ff5a36) there?
_EDGE_PIXELS = """([x, y]) => {
  const canvas = document.getElementById("canvas");
  const data = canvas.getContext("2d").getImageData(Math.max(0, x - 3), Math.max(0, y - 3), 7, 7).data;
  let hits = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 200 && data[i + 1] > 60 && data[i + 1] < 130 && data[i + 2] < 100) hits += 1;
  }
  return hits;
}"""

_SET_SLIDER = """(value) => {
  const slider = document.getElementById("threshold");
  slider.value = String(value);
  slider.dispatchEvent(new Event("input", { bubbles: true }));
}"""

_DROP = """async ([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type }));
  const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
  document.getElementById("drop").dispatchEvent(drop);
}"""


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh profile, removed with tmp
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", *FLAGS],
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


def _state(page) -> dict:
    return {
        "count": int(page.text_content("#box-count")),
        "total": int(page.text_content("#box-total")),
        "drawn": int(page.get_attribute("#canvas", "data-boxes-drawn")),
        "canvas": page.evaluate(
            "[document.getElementById('canvas').width, document.getElementById('canvas').height]"
        ),
    }


def test_page_uploads_an_xray_and_draws_boxes(live_server, browser_page, tmp_path, tiny_boxes):
    page = browser_page
    foreign: list[str] = []
    page.on(
        "request", lambda request: foreign.append(request.url) if _foreign(request.url, live_server) else None
    )
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{live_server.url}/")
    # Selectors, not wait_for_function: the page's CSP forbids the eval that the latter uses.
    page.wait_for_selector("#model-id:text-matches('^model: ')")

    width, height = 300, 240
    page.set_input_files(
        "#file", files=[{"name": "wrist.png", "mimeType": "image/png", "buffer": xray_png(width, height)}]
    )
    page.wait_for_selector("body[data-state=done]")
    page.evaluate(_SET_SLIDER, 0)
    state = _state(page)
    assert state == {"count": 2, "total": 2, "drawn": 2, "canvas": [width, height]}
    # The boxes are really on the canvas: the box colour sits on each box's left edge.
    for x1, y1, _, y2 in tiny_boxes:
        assert page.evaluate(_EDGE_PIXELS, [round(x1 * width), round((y1 + y2) / 2 * height)]) > 0
    assert page.evaluate(_EDGE_PIXELS, [5, 5]) == 0  # and not everywhere

    # The slider filters the returned boxes in the page, without a new request.
    scores = sorted(
        float(cell) for cell in page.locator("#detections tbody tr td:nth-child(3)").all_text_contents()
    )
    requests_before = len(page.evaluate("performance.getEntriesByType('resource')"))
    page.evaluate(_SET_SLIDER, round((scores[0] + scores[1]) / 2, 4))
    assert _state(page)["drawn"] == 1
    assert page.locator("#detections tbody tr.hidden").count() == 1
    page.evaluate(_SET_SLIDER, 1)
    assert _state(page)["drawn"] == (1 if scores[1] >= 1.0 else 0)
    assert len(page.evaluate("performance.getEntriesByType('resource')")) == requests_before
    page.evaluate(_SET_SLIDER, 0)

    screenshot = tmp_path / "serve-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 1000
    print(f"\nscreenshot of the page: {screenshot}")
    assert not errors, errors
    assert not foreign, f"the page fetched from elsewhere: {foreign}"


def test_page_shows_dicom_through_the_server_preview_and_accepts_a_drop(live_server, browser_page):
    import base64

    page = browser_page
    page.goto(f"{live_server.url}/")
    page.evaluate(_SET_SLIDER, 0)
    # The browser cannot decode DICOM: the page asks the server for a preview of the pixels.
    page.set_input_files(
        "#file",
        files=[{"name": "knee.dcm", "mimeType": "application/dicom", "buffer": dicom_bytes(True, 64, 80)}],
    )
    page.wait_for_selector("body[data-state=done]")
    assert _state(page) == {"count": 2, "total": 2, "drawn": 2, "canvas": [64, 80]}
    assert "dicom" in page.text_content("#status")

    # Dropping a file works like choosing one.
    png = base64.b64encode(xray_png(160, 120)).decode()
    page.evaluate(_DROP, [png, "dropped.png", "image/png"])
    page.wait_for_selector("body[data-state=done] #status:text-matches('^dropped.png')")
    assert _state(page) == {"count": 2, "total": 2, "drawn": 2, "canvas": [160, 120]}

    # A bad file gives a readable message, not a broken page.
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    page.wait_for_selector("body[data-state=error]")
    assert page.text_content("#status").startswith("415:")


def _foreign(url: str, server) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname != server.host


def test_page_draws_the_masks_of_a_segment_answer(browser_page, tmp_path):
    """A 'segment …' answer (a scripted tiny model, the real mask decoder) shows its mask."""
    import io

    import httpx
    import numpy as np
    from infer.seg_answers import HEIGHT, WIDTH, answering_detector
    from PIL import Image

    from paligemma_xray.infer.masks import MaskDecoder, write_random_vae
    from paligemma_xray.masks import decode_rle
    from paligemma_xray.serve import ServeConfig, ServerThread, create_app

    detector = answering_detector(MaskDecoder.load(write_random_vae(tmp_path / "vae-oid.npz", seed=5)))
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with ServerThread(create_app(detector, ServeConfig(max_new_tokens=40))) as server:
        page.goto(f"{server.url}/")
        page.wait_for_selector("#model-id:text-matches('^model: ')")
        page.fill("#prompt", "segment fracture")
        picture = io.BytesIO()
        Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)).save(picture, format="PNG")
        page.set_input_files(
            "#file", files=[{"name": "knee.png", "mimeType": "image/png", "buffer": picture.getvalue()}]
        )
        page.wait_for_selector("body[data-state=done]")
        page.evaluate(_SET_SLIDER, 0)
        assert page.get_attribute("#canvas", "data-masks-drawn") == "1"
        detector.model.lm_head.calls = 0  # the scripted head answers again from its start
        response = httpx.post(
            f"{server.url}/v1/detect",
            files={"file": ("knee.png", picture.getvalue(), "image/png")},
            data={"prompt": "segment fracture"},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    mask = decode_rle(response.json()["detections"][0]["mask"])
    canvas = page.evaluate(
        """() => { const c = document.getElementById("canvas");
                   return Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data); }"""
    )
    pixels = np.array(canvas, dtype=np.uint8).reshape(HEIGHT, WIDTH, 4)
    red = pixels[..., 0] > 40  # the orange tint on a black picture
    # The same answer again: the page tinted where the mask is, not elsewhere (away from the
    # box's outline and caption).
    inner = np.zeros_like(mask)
    inner[HEIGHT // 4 : 3 * HEIGHT // 4, WIDTH // 4 : 3 * WIDTH // 4] = True
    assert mask[inner].any() and (~mask[inner]).any()
    assert red[inner & mask].mean() > 0.95 and red[inner & ~mask].mean() < 0.2
    assert not errors, errors
