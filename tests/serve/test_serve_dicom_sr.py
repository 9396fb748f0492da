"""`POST /v1/detect?format=dicom-sr`: the SR bytes for a DICOM upload, the object `predict` writes."""

from __future__ import annotations

import io

import highdicom as hd
import httpx
import numpy as np
import pydicom
from infer.dicom_samples import radiograph  # tests/ is on the path (its conftest)
from serve_helpers import dicom_bytes, xray_png

from paligemma_xray.cli import main


def _post(url: str, data: bytes, filename: str, content_type: str, query: str = "?format=dicom-sr", **fields):
    return httpx.post(
        f"{url}/v1/detect{query}", files={"file": (filename, data, content_type)}, data=fields, timeout=60
    )


def test_dicom_sr_response_is_what_predict_writes(live_server, tiny_boxes_hf_dir, tmp_path):
    (tmp_path / "in").mkdir()
    path = radiograph(tmp_path / "in" / "wrist.dcm", monochrome1=True, compression="rle")
    response = _post(live_server.url, path.read_bytes(), "wrist.dcm", "application/dicom")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    served = hd.sr.srread(io.BytesIO(response.content))

    out = tmp_path / "out"
    assert (
        main(["predict", "--model", str(tiny_boxes_hf_dir), str(path), "--out", str(out), "--dicom-sr"]) == 0
    )
    written = hd.sr.srread(out / "dicom-sr" / "wrist.dcm.sr.dcm")
    assert served.SOPInstanceUID == written.SOPInstanceUID  # same model, image and settings
    source = pydicom.dcmread(path)
    assert served.StudyInstanceUID == source.StudyInstanceUID and served.PatientID == source.PatientID

    def corners(sr):
        groups = sr.content.get_planar_roi_measurement_groups()
        return np.array([np.asarray(g.roi.value)[[0, 2]].ravel() for g in groups]).reshape(-1, 4)

    assert len(corners(served)) > 0
    np.testing.assert_allclose(corners(served), corners(written), atol=1.0)

    # The threshold applies to the SR as it does to the JSON.
    strict = _post(live_server.url, path.read_bytes(), "wrist.dcm", "application/dicom", threshold="1")
    assert len(hd.sr.srread(io.BytesIO(strict.content)).content.get_planar_roi_measurement_groups()) == 0


def test_dicom_sr_refuses_what_it_cannot_report_on(fake_server):
    png = _post(fake_server.url, xray_png(), "knee.png", "image/png")
    assert png.status_code == 415 and png.json()["error"] == "not_dicom"
    # A DICOM without Study/Series UIDs: the SR could not reference it.
    bare = _post(fake_server.url, dicom_bytes(with_pixels=True), "bare.dcm", "application/dicom")
    assert bare.status_code == 422 and "StudyInstanceUID" in bare.json()["detail"]
    bad = _post(fake_server.url, xray_png(), "knee.png", "image/png", query="?format=xml")
    assert bad.status_code == 422 and "format" in bad.json()["detail"]
    # Without the parameter, JSON as before.
    plain = _post(fake_server.url, xray_png(), "knee.png", "image/png", query="")
    assert plain.status_code == 200 and plain.json()["count"] == 2
