"""DICOM SR of the detections: what `predict --dicom-sr` writes, read back by highdicom and pydicom.

The reference for the boxes is predict's own JSON; the SR is checked structurally by
highdicom (its TID 1500 reader), by walking the raw content tree with pydicom (a second
reader, independent of the writer), and by dicom3tools' ``dciodvfy`` where installed.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_samples import radiograph, study
from PIL import Image

from paligemma_xray import __version__
from paligemma_xray.cli import main
from paligemma_xray.infer import dicom_sr
from paligemma_xray.locations import Detections

FRACTURE = ("125605004", "SCT")


def _boxes(record: dict) -> np.ndarray:
    return np.array([d["box"] for d in record["detections"]["detections"]], dtype=np.float64).reshape(-1, 4)


def _raw_polylines(ds) -> list[np.ndarray]:
    """Every SCOORD POLYLINE in the content tree, found by walking the raw sequences."""
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "SCOORD" and item.get("GraphicType") == "POLYLINE":
                found.append(np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def _raw_texts(ds) -> dict[str, list[str]]:
    """TEXT content items by concept code value, walking the raw tree."""
    found: dict[str, list[str]] = {}

    def walk(items):
        for item in items:
            if item.get("ValueType") == "TEXT":
                code = item.ConceptNameCodeSequence[0].CodeValue
                found.setdefault(code, []).append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def _validator_errors(path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def predicted(tiny_boxes_hf_dir, tmp_path_factory):
    """predict --dicom-sr --secondary-capture over a CR study (M2, M1, RLE, JPEG-LS) and a PNG."""
    root = tmp_path_factory.mktemp("dicom_sr")
    folder = root / "in"
    sources = study(folder / "study", n=4)
    Image.new("L", (64, 64), 90).save(folder / "plain.png")
    out = root / "out"
    args = ["predict", "--model", str(tiny_boxes_hf_dir), str(folder), "--out", str(out)]
    assert main([*args, "--dicom-sr", "--secondary-capture", "--no-images"]) == 0
    return sources, out


def test_predict_writes_one_sr_per_dicom_image_with_the_json_boxes(predicted, tiny_boxes_hf_dir):
    tiny_model_id = str(tiny_boxes_hf_dir)
    sources, out = predicted
    assert sorted(p.name for p in (out / "dicom-sr" / "in" / "study").iterdir()) == sorted(
        f"{p.name}.sr.dcm" for p in sources
    )
    assert not (out / "dicom-sr" / "in" / "plain.png.sr.dcm").exists()  # not DICOM: no SR
    n_boxes = 0
    for source_path in sources:
        source = pydicom.dcmread(source_path)
        record = json.loads((out / "json" / "in" / "study" / f"{source_path.name}.json").read_text())
        expected = _boxes(record)
        scores = [d["score"] for d in record["detections"]["detections"]]
        sr = hd.sr.srread(out / "dicom-sr" / "in" / "study" / f"{source_path.name}.sr.dcm")

        # Patient and study copied from the source; the SR sits in the source's study.
        for keyword in (
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "AccessionNumber",
            "StudyDate",
            "ReferringPhysicianName",
        ):
            assert sr.get(keyword) == source.get(keyword), keyword
        assert sr.Modality == "SR" and sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID

        # One planar ROI per box: a closed POLYLINE of the box corners, in source pixels.
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(expected)
        for group, box, score in zip(groups, expected, scores):
            points = np.asarray(group.roi.value, dtype=np.float64)
            x1, y1, x2, y2 = box
            np.testing.assert_allclose(points, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], atol=1e-3)
            assert group.roi.GraphicType == "POLYLINE"
            assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
                source.SOPInstanceUID
            )
            assert (group.finding_type.value, group.finding_type.scheme_designator) == FRACTURE
            (measured,) = [m for m in group.get_measurements() if m.name.meaning == "Detection score"]
            assert measured.value == pytest.approx(score, abs=1e-5)
        # The second reader agrees: the same polylines, found in the raw tree.
        raw = _raw_polylines(
            pydicom.dcmread(out / "dicom-sr" / "in" / "study" / f"{source_path.name}.sr.dcm")
        )
        np.testing.assert_allclose(
            np.array([p[[0, 2]].ravel() for p in raw]).reshape(-1, 4), expected, atol=1e-3
        )

        # Image-level finding: present exactly when a box was kept.
        (image_group,) = sr.content.get_image_measurement_groups()
        (evaluation,) = image_group.get_qualitative_evaluations()
        assert (evaluation.name.value, evaluation.name.scheme_designator) == FRACTURE
        assert evaluation.value.meaning == ("Present" if len(expected) else "Absent")

        # The algorithm (TID 4019): name, version, model id and weights checksum, in every group.
        texts = _raw_texts(pydicom.dcmread(out / "dicom-sr" / "in" / "study" / f"{source_path.name}.sr.dcm"))
        assert texts["111001"] == ["paligemma-xray"] * (len(groups) + 1)  # Algorithm Name
        assert set(texts["111003"]) == {__version__}  # Algorithm Version
        assert any(t.startswith("sha256=") and len(t) == 7 + 64 for t in texts["111002"])  # Parameters
        assert any(t == f"model={tiny_model_id}" for t in texts["111002"])
        n_boxes += len(expected)
    assert n_boxes > 0  # the tiny model draws boxes, so the regions above were really checked


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK (dsrdump) is not installed")
def test_dcmtk_reads_the_sr_back_without_complaint(predicted):
    sources, out = predicted
    path = out / "dicom-sr" / "in" / "study" / f"{sources[0].name}.sr.dcm"
    result = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert (
        "Comprehensive SR Document" in result.stdout and '(125605004,SCT,"Fracture of bone")' in result.stdout
    )
    assert "POLYLINE" in result.stdout


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
def test_sr_and_secondary_capture_pass_an_independent_validator(predicted):
    sources, out = predicted
    for source_path in sources[:2]:
        assert _validator_errors(out / "dicom-sr" / "in" / "study" / f"{source_path.name}.sr.dcm") == []
        assert _validator_errors(out / "dicom-sc" / "in" / "study" / f"{source_path.name}.sc.dcm") == []


def test_secondary_capture_is_the_image_with_boxes_in_the_same_study(predicted):
    sources, out = predicted
    source = pydicom.dcmread(sources[0])
    sc = pydicom.dcmread(out / "dicom-sc" / "in" / "study" / f"{sources[0].name}.sc.dcm")
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.pixel_array.shape == (source.Rows, source.Columns, 3)


def _reread(sr):
    """An SR written to bytes and read back by highdicom's reader."""
    return hd.sr.srread(io.BytesIO(dicom_sr.to_bytes(sr)))


def _det(boxes, scores, size, labels=None) -> Detections:
    n = len(boxes)
    return Detections(
        xyxy=np.asarray(boxes, np.float32).reshape(-1, 4),
        class_name=labels or ["fracture"] * n,
        class_id=np.zeros(n, np.int64),
        score=np.asarray(scores, np.float32),
        seg_codes=np.full((n, 16), -1, np.int16),
        image_size=size,
        parse_issues={},
    )


def test_no_boxes_reports_fracture_absent_and_missing_type2_stays_empty(tmp_path):
    path = radiograph(tmp_path / "a.dcm", drop=("PatientBirthDate", "ReferringPhysicianName"))
    algorithm = dicom_sr.Algorithm(model_id="m", checksum="0" * 64)
    sr = dicom_sr.build_sr(path, Detections.empty((96, 128)), algorithm)
    read = hd.sr.ComprehensiveSR.from_dataset(
        pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_sr.to_bytes(sr)))
    )
    assert read.content.get_planar_roi_measurement_groups() == []
    (evaluation,) = read.content.get_image_measurement_groups()[0].get_qualitative_evaluations()
    assert evaluation.value.meaning == "Absent"
    assert "PatientBirthDate" in read and not read.PatientBirthDate  # present, empty: nothing invented
    assert not read.ReferringPhysicianName


def test_calibrated_probability_and_scaling_to_the_source_pixel_grid(tmp_path):
    path = radiograph(tmp_path / "a.dcm", width=200, height=100)
    algorithm = dicom_sr.Algorithm(model_id="m", checksum="1" * 64)
    # Detections on a decoded image of half the size: corners scale onto the source grid.
    found = _det([[10, 5, 50, 40]], [0.8], (100, 50))
    sr = _reread(dicom_sr.build_sr(path, found, algorithm, probability=[0.35]))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(np.asarray(group.roi.value)[[0, 2]].ravel(), [20, 10, 100, 80])
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Detection score"] == pytest.approx(0.8) and values[
        "Calibrated probability"
    ] == pytest.approx(0.35)


def test_same_model_same_image_same_uid_and_other_settings_another(tmp_path):
    path = radiograph(tmp_path / "a.dcm")
    algorithm = dicom_sr.Algorithm(model_id="m", checksum="2" * 64)
    found = _det([[1, 2, 30, 40]], [0.5], (96, 128))
    first = dicom_sr.build_sr(path, found, algorithm, settings="t=None")
    again = dicom_sr.build_sr(path, found, algorithm, settings="t=None")
    other = dicom_sr.build_sr(path, found, algorithm, settings="t=0.9")
    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID == other.SeriesInstanceUID  # one series per study and model


def test_a_dicom_without_its_uids_is_a_clear_error_naming_the_file(tiny_boxes_hf_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = radiograph(tmp_path / "in" / "nouid.dcm", drop=("StudyInstanceUID", "SeriesInstanceUID"))
    args = [
        "predict",
        "--model",
        str(tiny_boxes_hf_dir),
        str(bad),
        "--out",
        str(tmp_path / "out"),
        "--dicom-sr",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nouid.dcm" in err and "StudyInstanceUID" in err and "Traceback" not in err


def test_weights_checksum_follows_the_weights(tiny_model_v1):
    import copy

    import torch

    model, _ = tiny_model_v1
    twin = copy.deepcopy(model)
    assert dicom_sr.weights_checksum(twin) == dicom_sr.weights_checksum(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert dicom_sr.weights_checksum(changed) != dicom_sr.weights_checksum(model)


class _HalfCalibration:
    """Stands in for the calibration saved with a model: probability = score / 2."""

    def box_probability(self, scores):
        return np.asarray(scores) / 2

    def image_probability(self, detections):
        return float(np.max(detections.score, initial=0)) / 2


def test_a_model_calibration_puts_probabilities_in_the_sr(tmp_path):
    class Calibrated:
        model_id, calibration = "calibrated-model", _HalfCalibration()

    path = radiograph(tmp_path / "a.dcm")
    found = _det([[1, 2, 30, 40], [5, 5, 20, 20]], [0.8, 0.4], (96, 128))
    boxes, whole = dicom_sr.calibrated(Calibrated.calibration, found)
    sr = _reread(
        dicom_sr.build_sr(
            path, found, dicom_sr.algorithm_of(Calibrated()), probability=boxes, image_probability=whole
        )
    )
    per_box = [
        {m.name.meaning: m.value for m in g.get_measurements()}["Calibrated probability"]
        for g in sr.content.get_planar_roi_measurement_groups()
    ]
    assert per_box == pytest.approx([0.4, 0.2])
    (image_group,) = sr.content.get_image_measurement_groups()
    assert {m.name.meaning: m.value for m in image_group.get_measurements()}["Calibrated probability"] == (
        pytest.approx(0.4)
    )
    assert dicom_sr.calibrated(None, found) == (None, None)  # no calibration: no probabilities


def test_regions_on_a_multi_frame_image_name_its_first_frame(tmp_path):
    xa = radiograph(
        tmp_path / "xa.dcm", modality="XA", SOPClassUID="1.2.840.10008.5.1.4.1.1.12.1", NumberOfFrames=1
    )
    found = _det([[1, 2, 30, 40]], [0.5], (96, 128))
    sr = dicom_sr.build_sr(xa, found, dicom_sr.Algorithm(model_id="m", checksum="3" * 64))
    (group,) = _reread(sr).content.get_planar_roi_measurement_groups()
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 1
    single = dicom_sr.build_sr(
        radiograph(tmp_path / "cr.dcm"), found, dicom_sr.Algorithm(model_id="m", checksum="3" * 64)
    )
    (group,) = _reread(single).content.get_planar_roi_measurement_groups()
    assert "ReferencedFrameNumber" not in group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    if shutil.which("dciodvfy"):
        for name, report in (("xa", sr), ("cr", single)):
            (tmp_path / f"{name}.sr.dcm").write_bytes(dicom_sr.to_bytes(report))
            assert _validator_errors(tmp_path / f"{name}.sr.dcm") == []


def test_sr_and_secondary_capture_build_without_predict_or_torch(tmp_path):
    # dicom_sr used to import infer.predict (and so torch) to draw its Secondary Capture,
    # while predict imported dicom_sr: a circle. Now both draw through paligemma_xray.draw.
    import sys

    path = radiograph(tmp_path / "a.dcm")
    script = (
        "import sys\n"
        "from PIL import Image\n"
        "import numpy as np\n"
        "from paligemma_xray.infer import dicom_sr\n"
        "from paligemma_xray.locations import parse, encode\n"
        "found = parse(encode([[4, 4, 40, 40]], ['fracture'], (128, 96)), (128, 96), ['fracture'])\n"
        "algorithm = dicom_sr.Algorithm(model_id='m', checksum='4' * 64)\n"
        f"objects = dicom_sr.build_for_image({str(path)!r}, found, algorithm, secondary_capture=True,\n"
        "    image=Image.new('RGB', (128, 96)))\n"
        "print([o.Modality for o in objects],\n"
        "      sorted(m for m in ('paligemma_xray.infer.predict', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['SR', 'SR', 'OT'] []"  # the report, the viewer's boxes, the SC


def test_predict_pacs_and_serve_build_srs_through_one_function():
    import inspect

    from paligemma_xray import pacs
    from paligemma_xray.infer import predict
    from paligemma_xray.serve import dicom

    for module in (predict, pacs, dicom):
        source = inspect.getsource(module)
        assert "build_sr(" not in source and "build_secondary_capture(" not in source, module
    assert "build_for_image(" in inspect.getsource(dicom_sr.write_for_image)
