"""Our SRs in a real viewer: OHIF (npm ``@ohif/app``, served offline) on a real Orthanc, in Chromium.

A synthetic DX radiograph, the full report (:func:`dicom_sr.build_sr`) and the viewer SR
(:func:`dicom_sr.build_viewer_sr`) built from fixed boxes go into Orthanc; OHIF is opened on
the study, the viewer SR's series is opened, and the boxes OHIF draws (the SVG annotation
layer over the image canvas) are checked against the boxes we wrote, mapped through the
canvas's fit of the image. The full report is opened too: OHIF 3.13.2 shows nothing for it
(its image-level group has no region), which is why the viewer SR exists; should a later
OHIF draw it, that assertion tells us the viewer SR can go.

The browser test skips, saying why, without Chromium, Orthanc or the OHIF package
(``make ohif`` fetches it with npm into ``.cache/ohif``). ``PXR_UPDATE_SCREENSHOT=1`` copies
its screenshot to ``docs/viewer-ohif.png``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from chromium import CHROMIUM, FLAGS
from infer.dicom_samples import radiograph
from orthanc_server import PASSWORD, USER

from paligemma_xray.infer import dicom_sr
from paligemma_xray.locations import Detections

BOXES = np.array([[100, 120, 220, 260], [300, 300, 420, 380]], np.float32)  # (x1, y1, x2, y2), pixels
SCORES = np.array([0.9, 0.7], np.float32)
SIZE = 512
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "viewer-ohif.png"
ALGORITHM = dicom_sr.Algorithm(model_id="fixed-boxes", checksum="ab" * 32)


def _detections(boxes: np.ndarray = BOXES, scores: np.ndarray = SCORES) -> Detections:
    n = len(boxes)
    return Detections(
        xyxy=np.asarray(boxes, np.float32).reshape(-1, 4),
        class_name=["fracture"] * n,
        class_id=np.zeros(n, np.int64),
        score=np.asarray(scores, np.float32),
        seg_codes=np.full((n, 16), -1, np.int16),
        image_size=(SIZE, SIZE),
        parse_issues={},
    )


def _study(folder: Path) -> tuple[Path, Path, Path]:
    """(image, full report, viewer SR) files of one study."""
    folder.mkdir(parents=True, exist_ok=True)
    image = radiograph(folder / "image.dcm", modality="DX", width=SIZE, height=SIZE, seed=3)
    full = folder / "report.sr.dcm"
    full.write_bytes(dicom_sr.to_bytes(dicom_sr.build_sr(image, _detections(), ALGORITHM)))
    viewer = folder / "viewer.sr.dcm"
    viewer_sr = dicom_sr.build_viewer_sr(image, _detections(), ALGORITHM)
    assert viewer_sr is not None
    viewer.write_bytes(dicom_sr.to_bytes(viewer_sr))
    return image, full, viewer


# -- the viewer SR itself (no browser) ---------------------------------------------------------


def test_viewer_sr_holds_one_region_per_box_and_no_group_without_one(tmp_path):
    image, full, viewer = _study(tmp_path)
    sr = hd.sr.srread(viewer)
    source = pydicom.dcmread(image)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(BOXES)
    assert len(sr.content.get_image_measurement_groups()) == 0  # the group OHIF cannot show
    for group, box, score in zip(groups, BOXES, SCORES, strict=True):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(region.value, dicom_sr.polyline(box))
        referenced = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert group.finding_type.value == "125605004"
        assert group.get_measurements()[0].value == pytest.approx(float(score), abs=1e-6)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    report = pydicom.dcmread(full)
    assert sr.SeriesInstanceUID not in (report.SeriesInstanceUID, source.SeriesInstanceUID)
    assert sr.SOPInstanceUID != report.SOPInstanceUID
    again = dicom_sr.build_viewer_sr(image, _detections(), ALGORITHM)
    assert again is not None and again.SOPInstanceUID == sr.SOPInstanceUID  # a PACS keeps one copy


def test_no_box_no_viewer_sr(tmp_path):
    image = radiograph(tmp_path / "image.dcm", modality="DX", seed=1)
    assert dicom_sr.build_viewer_sr(image, _detections(BOXES[:0], SCORES[:0]), ALGORITHM) is None


def test_predict_files_hold_the_viewer_sr_beside_the_report_when_there_are_boxes(tmp_path):
    image = radiograph(tmp_path / "image.dcm", modality="DX", width=SIZE, height=SIZE, seed=3)
    written = dicom_sr.write_for_image(tmp_path / "out", "a", image, None, _detections(), ALGORITHM)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "dicom-sr/a.sr.dcm",
        "dicom-sr-viewer/a.sr.dcm",
    ]
    shown = hd.sr.srread(written[1])
    assert shown.SeriesNumber == dicom_sr.SERIES_NUMBER_VIEWER_SR
    assert len(shown.content.get_planar_roi_measurement_groups()) == len(BOXES)
    none = dicom_sr.write_for_image(
        tmp_path / "out", "b", image, None, _detections(BOXES[:0], SCORES[:0]), ALGORITHM
    )
    assert [p.name for p in none] == ["b.sr.dcm"]  # the report says "absent"; nothing to draw


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
def test_viewer_sr_passes_an_independent_validator(tmp_path):
    _, _, viewer = _study(tmp_path)
    result = subprocess.run(["dciodvfy", str(viewer)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


# -- OHIF in Chromium --------------------------------------------------------------------------

# The SVG polylines OHIF draws over the image, and the image canvas's size, in CSS pixels.
_DRAWN = """() => {
  const svg = document.querySelector("svg.svg-layer");
  const canvas = document.querySelector("canvas.cornerstone-canvas");
  if (!svg || !canvas) return null;
  const lines = Array.from(svg.querySelectorAll("polyline")).map((p) =>
    p.getAttribute("points").match(/-?[0-9.]+/g).map(Number));
  const box = canvas.getBoundingClientRect();
  const labels = Array.from(svg.querySelectorAll("text")).map((t) => t.textContent);
  return { lines, labels, width: box.width, height: box.height };
}"""


def _skip_tour(page) -> None:
    """Close OHIF's first-visit tour, which shows up with the first image (if it does)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        page.get_by_text("Skip all").first.click(timeout=10_000)


def _open_series(page, description: str) -> None:
    page.get_by_text(description).first.dblclick()


def _drawn(page, expected: int, timeout: float = 30.0) -> dict | None:
    deadline = time.monotonic() + timeout
    drawn = None
    while time.monotonic() < deadline:
        drawn = page.evaluate(_DRAWN)
        if drawn and len(drawn["lines"]) >= expected:
            return drawn
        time.sleep(0.5)
    return drawn


def _to_image(drawn: dict, points: list[list[float]]) -> np.ndarray:
    """Canvas points back to image pixels: OHIF fits the image in the canvas, centred."""
    scale = min(drawn["width"] / SIZE, drawn["height"] / SIZE)
    offset = np.array([(drawn["width"] - SIZE * scale) / 2, (drawn["height"] - SIZE * scale) / 2])
    return (np.asarray(points, np.float64).reshape(-1, 2) - offset) / scale


def _small_png(png: bytes, target: Path) -> None:
    from PIL import Image

    picture = Image.open(io.BytesIO(png)).convert("RGB")
    picture.quantize(colors=64).save(target, optimize=True)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="the system Chromium is not installed (make browser)")
def test_ohif_draws_the_boxes_of_our_viewer_sr_on_the_image(tmp_path):
    from ohif_viewer import OhifServer, require_ohif
    from orthanc_server import Orthanc
    from playwright.sync_api import sync_playwright

    dist = require_ohif()
    image, full, viewer = _study(tmp_path / "study")
    study_uid = pydicom.dcmread(image).StudyInstanceUID
    orthanc = Orthanc(tmp_path / "orthanc").start()
    ohif = None
    try:
        orthanc.upload([image, full, viewer])
        ohif = OhifServer(dist, orthanc.url, (USER, PASSWORD)).start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.set_default_timeout(60_000)
                page.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={study_uid}")
                page.wait_for_selector("canvas.cornerstone-canvas")
                _skip_tour(page)

                # The full report: OHIF 3.13.2 draws none of it (see build_viewer_sr).
                _open_series(page, "fracture detection")
                full_drawn = _drawn(page, 1, timeout=8)
                assert not (full_drawn and full_drawn["lines"]), "OHIF now draws the full report"

                _open_series(page, "boxes for viewers")
                drawn = _drawn(page, len(BOXES))
                assert drawn is not None and len(drawn["lines"]) == len(BOXES), drawn
                found = sorted((_to_image(drawn, line) for line in drawn["lines"]), key=lambda p: p[0, 0])
                # BOXES are ordered left to right, as ``found`` is.
                for line, box in zip(found, map(dicom_sr.polyline, BOXES), strict=True):
                    np.testing.assert_allclose(line, box, atol=1.0)  # within a pixel of what we wrote
                assert sum("Detection score: 0.90" in label for label in drawn["labels"]) == 1
                assert sum("Detection score: 0.70" in label for label in drawn["labels"]) == 1
                _small_png(page.screenshot(), tmp_path / "viewer-ohif.png")
                if os.environ.get("PXR_UPDATE_SCREENSHOT"):  # refreshes docs/viewer-ohif.png
                    shutil.copyfile(tmp_path / "viewer-ohif.png", SCREENSHOT)
            finally:
                browser.close()
    finally:
        if ohif is not None:
            ohif.stop()
        orthanc.stop()
