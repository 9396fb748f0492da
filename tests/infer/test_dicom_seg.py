"""DICOM SEG of the masks and the IHE AI Results conventions on SR, SEG and SC.

Read back by readers independent of the writer: pydicom (raw attributes), highdicom's
``segread`` (segments and their pixels per source instance), dicom3tools' ``dciodvfy`` and
DCMTK's ``dsrdump`` where installed.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_samples import radiograph
from PIL import Image
from seg_answers import ANSWER

from paligemma_xray.errors import ConfigError
from paligemma_xray.infer import dicom_sr
from paligemma_xray.infer.ai_results import NOTICE_ENV
from paligemma_xray.infer.dicom_seg import build_seg, seg_uids
from paligemma_xray.infer.masks import MaskDecoder, write_random_vae
from paligemma_xray.infer.predict import predict
from paligemma_xray.infer.settings import PredictSettings
from paligemma_xray.locations import Detections
from paligemma_xray.masks import decode_rle, encode_rle

ALGORITHM = dicom_sr.Algorithm(model_id="runs/r1", checksum="0123456789abcdef" * 4)


def _validator_errors(path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def source(tmp_path):
    return radiograph(tmp_path / "cr.dcm", width=96, height=128)


def _masked(width=96, height=128) -> Detections:
    a = np.zeros((height, width), bool)
    a[10:60, 20:50] = True
    b = np.zeros((height, width), bool)
    b[40:100, 30:80] = True  # overlaps a
    return Detections(
        xyxy=[[20, 10, 50, 60], [0, 0, 5, 5], [30, 40, 80, 100]],
        class_name=["fracture", "fracture", "cast"],
        class_id=[0, 0, -1],
        score=[0.9, 0.5, 0.4],
        seg_codes=np.full((3, 16), -1),
        image_size=(width, height),
        masks=[encode_rle(a), None, encode_rle(b)],
    )


def _ai_item(ds):
    items = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(items) == 1
    return items[0]


def test_seg_holds_one_segment_per_mask_referencing_the_source(source, tmp_path) -> None:
    detections = _masked()
    seg = build_seg(source, detections, ALGORITHM, settings="s")
    path = tmp_path / "x.seg.dcm"
    path.write_bytes(dicom_sr.to_bytes(seg))
    raw = pydicom.dcmread(path)
    original = pydicom.dcmread(source)
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    assert raw.StudyInstanceUID == original.StudyInstanceUID and raw.PatientID == original.PatientID
    assert raw.SeriesInstanceUID != original.SeriesInstanceUID
    assert (raw.SeriesInstanceUID, raw.SOPInstanceUID) == seg_uids(
        original.StudyInstanceUID, original.SOPInstanceUID, ALGORITHM, "s"
    )
    referenced = [
        item.ReferencedSOPInstanceUID
        for series in raw.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    ]
    assert referenced == [original.SOPInstanceUID]
    segments = raw.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["fracture 1", "cast 3"]  # the unmasked object has none
    assert segments[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "72704001"
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99PXRAY"
    for segment in segments:
        assert (
            segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "paligemma-xray"
        )
        parameters = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        assert ALGORITHM.checksum in parameters and "runs/r1" in parameters
    # highdicom's reader: each segment's pixels on the source image are the object's mask.
    reread = hd.seg.segread(path)
    pixels = reread.get_pixels_by_source_instance(
        [original.SOPInstanceUID], segment_numbers=[1, 2], combine_segments=False
    )[0]
    assert pixels.shape == (128, 96, 2)
    np.testing.assert_array_equal(pixels[..., 0] > 0, decode_rle(detections.masks[0]))
    np.testing.assert_array_equal(pixels[..., 1] > 0, decode_rle(detections.masks[2]))
    assert raw.SegmentsOverlap == "YES"


def test_no_mask_no_seg(source) -> None:
    boxes = Detections.empty((96, 128))
    assert build_seg(source, boxes, ALGORITHM) is None


def test_ai_results_conventions_on_sr_seg_and_sc(source, monkeypatch) -> None:
    detections = _masked()
    image = Image.new("RGB", (96, 128))
    objects = {
        "sr": dicom_sr.build_sr(source, detections, ALGORITHM),
        "seg": build_seg(source, detections, ALGORITHM),
        "sc": dicom_sr.build_secondary_capture(source, image, detections, ALGORITHM),
    }
    for kind, built in objects.items():
        ds = pydicom.dcmread(io.BytesIO(dicom_sr.to_bytes(built)))
        item = _ai_item(ds)
        code = item.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            "Newcode1",
            "99IHE",
            "Processing Algorithm",
        ), kind
        assert item.Manufacturer == "paligemma-xray" and item.ManufacturerModelName == "paligemma-xray"
        assert list(item.SoftwareVersions) == [ALGORITHM.version, ALGORITHM.checksum]
        assert (
            "runs/r1" in item.ContributionDescription and ALGORITHM.checksum in item.ContributionDescription
        )
        assert item.DeviceUID
        assert ds.SeriesDescription.endswith("(AI result, not for diagnosis)"), kind
        assert len(ds.SeriesDescription) <= 64
    sr = pydicom.dcmread(io.BytesIO(dicom_sr.to_bytes(objects["sr"])))
    assert sr.VerificationFlag == "UNVERIFIED"
    # The same device in the SR's observer context and in Contributing Equipment.
    assert _ai_item(sr).DeviceUID in str(sr.ContentSequence)
    monkeypatch.setenv(NOTICE_ENV, "research use")
    assert dicom_sr.build_sr(source, detections, ALGORITHM).SeriesDescription.endswith("(research use)")
    monkeypatch.setenv(NOTICE_ENV, "")
    assert build_seg(source, detections, ALGORITHM).SeriesDescription == "paligemma-xray fracture masks"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
def test_seg_sr_and_sc_pass_an_independent_validator(source, tmp_path) -> None:
    detections = _masked()
    image = Image.new("RGB", (96, 128))
    for name, built in (
        ("seg", build_seg(source, detections, ALGORITHM)),
        ("sr", dicom_sr.build_sr(source, detections, ALGORITHM)),
        ("sc", dicom_sr.build_secondary_capture(source, image, detections, ALGORITHM)),
    ):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(dicom_sr.to_bytes(built))
        assert _validator_errors(path) == [], name


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK (dsrdump) is not installed")
def test_dcmtk_reads_the_marked_sr(source, tmp_path) -> None:
    path = tmp_path / "sr.dcm"
    path.write_bytes(dicom_sr.to_bytes(dicom_sr.build_sr(source, _masked(), ALGORITHM)))
    result = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert "UNVERIFIED" in result.stdout or "Unverified" in result.stdout


def test_predict_dicom_seg_end_to_end(tmp_path) -> None:
    from seg_answers import answering_detector

    folder = tmp_path / "in"
    folder.mkdir()
    source = radiograph(folder / "knee.dcm", width=96, height=128)
    vae = write_random_vae(tmp_path / "vae-oid.npz", seed=1)
    detector = answering_detector(MaskDecoder.load(vae))
    settings = PredictSettings(
        paths=[str(folder)], out=str(tmp_path / "out"), prompt="segment fracture", max_new_tokens=40,
        dicom_sr=True, dicom_seg=True, workers=0,
    )  # fmt: skip
    summary = predict(detector, settings, progress=False)
    assert summary["dicom_seg"] == 1
    record = (tmp_path / "out" / "json" / "in" / "knee.dcm.json").read_text()
    assert ANSWER in record
    seg = hd.seg.segread(tmp_path / "out" / "dicom-seg" / "in" / "knee.dcm.seg.dcm")
    assert seg.number_of_segments == 1
    pixels = seg.get_pixels_by_source_instance([pydicom.dcmread(source).SOPInstanceUID])[0]
    import json

    mask = decode_rle(json.loads(record)["detections"]["detections"][0]["mask"])
    np.testing.assert_array_equal(pixels[..., 0] > 0, mask)
    assert (tmp_path / "out" / "dicom-sr" / "in" / "knee.dcm.sr.dcm").is_file()
    # --dicom-seg without a mask decoder is refused before any work.
    with pytest.raises(ConfigError, match="--seg-vae"):
        settings = PredictSettings(
            paths=[str(folder)], out=str(tmp_path / "out2"), prompt="segment fracture", dicom_seg=True
        )
        predict(answering_detector(None), settings, progress=False)
