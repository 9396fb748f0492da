"""Detections as DICOM: a TID 1500 Measurement Report (Comprehensive SR), optionally a Secondary Capture.

A radiology department reads DICOM objects in its viewers, not JSON. For one source image
and its :class:`~paligemma_xray.locations.Detections` this module builds, through highdicom:

* a **Comprehensive SR** whose content is a TID 1500 *Imaging Measurement Report*:

  - an image library entry for the source image (TID 1600);
  - one image-level measurement group (TID 1501): finding "Fracture of bone"
    (SNOMED CT 125605004) evaluated *Present* or *Absent* (present when at least one box
    was kept), with the highest box score;
  - one planar-ROI group (TID 1410) per box: a closed ``POLYLINE`` of five points (the
    box's corners, the first repeated) in the source image's pixel coordinates, the finding
    coded (125605004 for a "fracture" label, the label itself in our private scheme
    otherwise), the box's score and, where one exists, its calibrated probability;
  - the algorithm (TID 4019): name ``paligemma-xray``, its version, the model's id and the
    SHA-256 of its weights; the device observer context names the same.

  Patient, study and referring-physician attributes are copied from the source by highdicom
  (nothing is invented: an attribute the source lacks stays empty, as their Type 2 allows);
  the source's Study, Series and SOP Instance UIDs are referenced.

* optionally a **Secondary Capture** (RGB) with the boxes drawn, for viewers that do not
  render SR, in the same study and its own series.

**Pixel convention.** DICOM 2D spatial coordinates (SCOORD, PS3.3 C.18.6.1.1; the same as
presentation states' PIXEL units) are (column, row) pairs in which the *top-left corner of
the top-left pixel* is (0.0, 0.0), the centre of that pixel is (0.5, 0.5) and the
bottom-right corner of the bottom-right pixel is (Columns, Rows). Detections' ``xyxy`` are
continuous coordinates on the decoded image with the same origin (``<loc0000>`` is the left
edge, ``<loc1023>`` the right edge at ``width``), and the decoded image has the source's
Columns × Rows pixels, so a box corner maps onto DICOM coordinates unchanged (scaled only if
the decoded size differs). A box (x1, y1, x2, y2) becomes
(x1, y1) (x2, y1) (x2, y2) (x1, y2) (x1, y1).

**Identity.** UIDs are derived (``pydicom.uid.generate_uid`` with entropy sources) from the
source's SOP Instance UID, the model checksum and the decoding settings, so running the same
model on the same image again yields the same SR UID: a PACS stores it once, and
:mod:`paligemma_xray.pacs` can tell that a study already holds our report.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from paligemma_xray.errors import DataError
from paligemma_xray.locations import Detections
from paligemma_xray.model.fingerprint import ALGORITHM_NAME, Algorithm, weights_checksum

if TYPE_CHECKING:
    from paligemma_xray.infer.calibrated import Calibration
    from paligemma_xray.infer.detector import DetectorLike

MANUFACTURER = "paligemma-xray"
SERIES_NUMBER_SR = 7701  # our series numbers, out of the way of the modality's (1, 2, …)
SERIES_NUMBER_SC = 7702
FRACTURE_LABELS = {"fracture", "fractures", "bone fracture", "fracture of bone"}
PRIVATE_SCHEME = "99PXRAY"  # "99" designators are private coding schemes (PS3.16 8.2)

# Attributes a source image must have for an SR to reference it and place its regions.
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
# Patient/study attributes the SR copies (Type 2 in the SR: empty when the source lacks them).
COPIED_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _codes() -> dict[str, Any]:
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "fracture": Code("125605004", "SCT", "Fracture of bone"),
        "present": codes.SCT.Present,
        "absent": codes.SCT.Absent,
        "procedure": Code("168537006", "SCT", "Plain radiography"),
        "score": Code("PXR001", PRIVATE_SCHEME, "Detection score"),
        "probability": Code("PXR002", PRIVATE_SCHEME, "Calibrated probability"),
        "no_units": Code("1", "UCUM", "no units"),
        "device": codes.DCM.Device,
    }


def calibrated(
    calibration: Calibration | None, detections: Detections
) -> tuple[np.ndarray | None, float | None]:
    """(per-box, image-level) calibrated probabilities of ``detections``; ``(None, None)`` without one.

    ``calibration``: the one saved with the model (``DetectorLike.calibration``, read by
    ``Detector.load``; :mod:`paligemma_xray.infer.calibrated`).
    """
    if calibration is None:
        return None, None
    boxes = None
    if detections.score is not None and len(detections):
        boxes = np.asarray(calibration.box_probability(np.asarray(detections.score)), dtype=np.float64)
    return boxes, float(calibration.image_probability(detections))


def algorithm_of(detector: DetectorLike) -> Algorithm:
    """The :class:`Algorithm` of a detector (its ``model_id`` and its weights' checksum).

    A detector without a torch ``model`` (a fused detector, a stand-in) is identified by the
    SHA-256 of its ``model_id``.
    """
    model_id = str(detector.model_id)
    model = getattr(detector, "model", None)  # not part of DetectorLike: only a Detector has one
    if model is not None and hasattr(model, "state_dict"):
        checksum = weights_checksum(model)
    else:
        checksum = hashlib.sha256(model_id.encode()).hexdigest()
    return Algorithm(model_id=model_id, checksum=checksum)


# -- reading the source ------------------------------------------------------------------------


def read_source(source: str | Path | bytes | Any, *, name: str | Path | None = None) -> Any:
    """The source image's header as a pydicom Dataset, checked for what an SR needs.

    ``source``: a path, the file's bytes, or an already-read Dataset.

    Raises:
        DataError: not DICOM, or without one of :data:`REQUIRED` (naming the file and the
            missing attributes).
    """
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    label = str(name if name is not None else (source if isinstance(source, (str, Path)) else "<bytes>"))
    if isinstance(source, Dataset):
        ds = source
    else:
        raw = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            ds = pydicom.dcmread(raw, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError) as error:
            raise DataError(
                f"a DICOM SR needs a DICOM source image; this one cannot be read: {error}", path=label
            ) from None
    missing = [keyword for keyword in REQUIRED if not ds.get(keyword)]
    if missing:
        raise DataError(f"cannot write a DICOM SR for this image: it lacks {', '.join(missing)}", path=label)
    return ds


def _evidence(ds: Any) -> Any:
    """A header-only copy of ``ds`` with absent Type 2 patient/study attributes present and empty."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for element in ds:
        if element.tag.group == 0x7FE0 or element.keyword in ("PixelData", "FloatPixelData"):
            continue
        header.add(copy.deepcopy(element))
    for keyword in COPIED_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _scale(detections: Detections, ds: Any) -> np.ndarray:
    """Boxes in the source's (column, row) pixel coordinates, clipped to the image."""
    columns, rows = int(ds.Columns), int(ds.Rows)
    width, height = detections.image_size
    boxes = np.asarray(detections.xyxy, dtype=np.float64).reshape(-1, 4).copy()
    if (width, height) != (columns, rows) and width and height:
        boxes[:, [0, 2]] *= columns / width
        boxes[:, [1, 3]] *= rows / height
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, columns)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, rows)
    return boxes


def polyline(box: Sequence[float]) -> np.ndarray:
    """The closed five-point POLYLINE of a box (x1, y1, x2, y2), as (column, row) rows."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)


def settings_key(prompt: str, threshold: float | None) -> str:
    """The decoding settings that make a different report of the same image with the same model."""
    return f"prompt={prompt}|threshold={threshold}"


def sr_uids(study_uid: str, sop_uid: str, algorithm: Algorithm, settings: str = "") -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of our SR for the image ``sop_uid`` of ``study_uid``.

    The series is one per (study, model); the instance one per (image, model, settings), so
    the same run twice produces the same object and a PACS keeps one copy.
    """
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["pxr-sr-series", str(study_uid), algorithm.checksum])
    instance = generate_uid(entropy_srcs=["pxr-sr", str(sop_uid), algorithm.checksum, settings])
    return str(series), str(instance)


def sc_series_uid(study_uid: str, algorithm: Algorithm) -> str:
    """Series Instance UID of our Secondary Captures in ``study_uid`` (one per study and model)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["pxr-sc-series", str(study_uid), algorithm.checksum]))


def _multiframe_class(sop_class_uid: str) -> bool:
    """Whether the SOP class is a multi-frame IOD (then a region names its frame; else it must not)."""
    try:
        from highdicom._standard_utils import is_attribute_in_iod  # the check highdicom applies itself

        return bool(is_attribute_in_iod("NumberOfFrames", sop_class_uid))
    except (ImportError, KeyError):
        return False


def _library_ready(ds: Any) -> bool:
    """Whether highdicom can describe ``ds`` in the image library (TID 1601).

    Its descriptors of a projection radiograph (TID 1603) need Patient Orientation and
    Imager Pixel Spacing; a CR without them is still referenced by every measurement group
    and in the evidence sequence, just not listed in the library.
    """
    import highdicom as hd

    try:
        hd.sr.ImageLibrary([ds])
    except (AttributeError, IndexError, TypeError, ValueError):
        return False
    return True


def _finding(label: str, codes: dict[str, Any]) -> Any:
    if label.strip().lower() in FRACTURE_LABELS:
        return codes["fracture"]
    return private_code(label)


def private_code(label: str) -> Any:
    """A label without a standard code, in our private scheme (the same code in SR and SEG)."""
    from pydicom.sr.coding import Code

    text = label.strip() or "unlabelled"
    value = "PXR-" + hashlib.sha1(text.encode()).hexdigest()[:10].upper()
    return Code(value, PRIVATE_SCHEME, text[:64])


def build_sr(
    source: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    probability: Sequence[float] | np.ndarray | None = None,
    image_probability: float | None = None,
    settings: str = "",
    name: str | Path | None = None,
) -> Any:
    """The Comprehensive SR (a ``highdicom.sr.ComprehensiveSR``) reporting ``detections`` on ``source``.

    Args:
        source: the source image (path, bytes or pydicom Dataset; pixels are not needed).
        detections: the boxes kept for this image (already thresholded).
        algorithm: :func:`algorithm_of` the detector.
        probability: calibrated probabilities, one per box, where a calibrator exists
            (defaults to ``detections.probability`` when Detections carry one).
        image_probability: the calibrated probability that the image shows a fracture,
            reported with the image-level finding (see :func:`calibrated`).
        settings: decoding settings (prompt, threshold…) that make a different report of the
            same image with the same model; enters the SR's UID.
        name: what errors call the source.

    Raises:
        DataError: the source is not DICOM or lacks an attribute the SR needs.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    ds = read_source(source, name=name)
    codes = _codes()
    evidence = _evidence(ds)
    if probability is None:
        probability = getattr(detections, "probability", None)
    boxes = _scale(detections, ds)
    scores = detections.score
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=algorithm.parameters
    )
    series_uid, sop_uid = sr_uids(ds.StudyInstanceUID, ds.SOPInstanceUID, algorithm, settings)
    context = _device_context(algorithm, codes)
    source_ref = _source_ref(ds)

    def score_of(i: int) -> float | None:  # 6 decimals: not float32's noise (0.89999997…)
        return None if scores is None else round(float(scores[i]), 6)

    kept_scores = [s for s in (score_of(i) for i in range(len(detections))) if s is not None]
    image_measurements = []
    if kept_scores:
        image_measurements.append(
            hd.sr.Measurement(name=codes["score"], value=max(kept_scores), unit=codes["no_units"])
        )
    if image_probability is not None:
        image_measurements.append(
            hd.sr.Measurement(
                name=codes["probability"], value=round(float(image_probability), 6), unit=codes["no_units"]
            )
        )
    groups: list[Any] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(generate_uid(entropy_srcs=[sop_uid, "image"])), identifier="image-level finding"
            ),
            finding_type=codes["fracture"],
            algorithm_id=algorithm_id,
            source_images=[hd.sr.SourceImageForMeasurementGroup(**source_ref)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=codes["fracture"], value=codes["present"] if len(detections) else codes["absent"]
                )
            ],
            measurements=image_measurements or None,
        )
    ]
    groups += _box_groups(detections, boxes, sop_uid, source_ref, algorithm_id, codes, probability)
    return _measurement_report(
        ds, evidence, context, groups, algorithm, codes,
        uids=(series_uid, sop_uid), series_number=SERIES_NUMBER_SR,
        subject=f"{ALGORITHM_NAME} fracture detection",
    )  # fmt: skip


def _device_context(algorithm: Algorithm, codes: dict[str, Any]) -> Any:
    """The observation context: the algorithm as the observing device (its Device UID is
    :func:`~paligemma_xray.infer.ai_results.device_uid`, the one Contributing Equipment names)."""
    import highdicom as hd

    from paligemma_xray.infer.ai_results import device_uid

    observer = hd.sr.ObserverContext(
        observer_type=codes["device"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=Path(algorithm.model_id).name[:64] or algorithm.model_id[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def _source_ref(ds: Any) -> dict[str, Any]:
    """How a group points at the source image (boxes are on the first frame of a multi-frame)."""
    source_ref: dict[str, Any] = {
        "referenced_sop_class_uid": str(ds.SOPClassUID),
        "referenced_sop_instance_uid": str(ds.SOPInstanceUID),
    }
    if _multiframe_class(str(ds.SOPClassUID)):  # what load_image decodes
        source_ref["referenced_frame_numbers"] = [1]
    return source_ref


def _box_groups(
    detections: Detections,
    boxes: Any,
    sop_uid: str,
    source_ref: dict[str, Any],
    algorithm_id: Any,
    codes: dict[str, Any],
    probability: Any,
) -> list[Any]:
    """One planar-ROI group (TID 1410) per box: its closed POLYLINE, finding, score and, with
    ``probability``, its calibrated probability. Shared by the full and the viewer's report."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    groups = []
    for i in range(len(detections)):
        measurements = []
        if detections.score is not None:  # 6 decimals: not float32's noise (0.89999997…)
            score = round(float(detections.score[i]), 6)
            measurements.append(hd.sr.Measurement(name=codes["score"], value=score, unit=codes["no_units"]))
        if probability is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=codes["probability"], value=round(float(probability[i]), 6), unit=codes["no_units"]
                )
            )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(generate_uid(entropy_srcs=[sop_uid, "box", str(i)])), identifier=f"box {i + 1}"
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=polyline(boxes[i]),
                    source_image=hd.sr.SourceImageForRegion(**source_ref),
                ),
                finding_type=_finding(detections.class_name[i], codes),
                algorithm_id=algorithm_id,
                measurements=measurements or None,
            )
        )
    return groups


def _measurement_report(
    ds: Any,
    evidence: Any,
    context: Any,
    groups: list[Any],
    algorithm: Algorithm,
    codes: dict[str, Any],
    *,
    uids: tuple[str, str],
    series_number: int,
    subject: str,
) -> Any:
    """A TID 1500 report of ``groups`` as a Comprehensive SR, marked as an AI result.

    Shared by the full report (:func:`build_sr`) and the viewer's (:func:`build_viewer_sr`):
    they differ in their groups, series and description only.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    series_uid, sop_uid = uids
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes["procedure"],
        imaging_measurements=groups,
        referenced_images=[evidence] if _library_ready(evidence) else None,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=int(ds.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=subject,
        software_versions=algorithm.version,
        manufacturer_model_name=algorithm.name,
        coding_schemes=[
            CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="paligemma-xray private codes")
        ],
    )
    return _ai_result(sr, algorithm, subject)


def build_secondary_capture(
    source: Any,
    image: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    settings: str = "",
    name: str | Path | None = None,
) -> Any:
    """A Secondary Capture (RGB) of ``image`` with the boxes drawn, in the source's study.

    ``image``: the decoded source (``data.load_image``). For viewers that do not render SR.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from paligemma_xray.draw import annotate

    ds = read_source(source, name=name)
    evidence = _evidence(ds)
    pixels = np.ascontiguousarray(np.asarray(annotate(image, detections).convert("RGB"), dtype=np.uint8))
    series = sc_series_uid(ds.StudyInstanceUID, algorithm)
    instance = str(
        generate_uid(entropy_srcs=["pxr-sc", str(ds.SOPInstanceUID), algorithm.checksum, settings])
    )
    orientation = ds.get("PatientOrientation")
    given = (
        (str(orientation[0]), str(orientation[1]))
        if orientation is not None and len(orientation) == 2
        else None
    )
    arguments: dict[str, Any] = {
        "ref_dataset": evidence,
        "pixel_array": pixels,
        "photometric_interpretation": "RGB",
        "bits_allocated": 8,
        "coordinate_system": "PATIENT",
        "series_instance_uid": series,
        "series_number": SERIES_NUMBER_SC,
        "sop_instance_uid": instance,
        "instance_number": int(ds.get("InstanceNumber") or 1),
        "manufacturer": MANUFACTURER,
        "series_description": f"{ALGORITHM_NAME} boxes (secondary capture)",
    }
    try:
        sc = hd.sc.SCImage.from_ref_dataset(patient_orientation=given or ("A", "F"), **arguments)
    except ValueError:  # an orientation highdicom's letters do not cover (e.g. "AL")
        given = None
        sc = hd.sc.SCImage.from_ref_dataset(patient_orientation=("A", "F"), **arguments)
    if given is None:
        sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2C: unknown stays empty rather than guessed
    sc.Laterality = ds.get("Laterality") or None  # type: ignore[assignment]  # Type 2C: the source's, else empty
    return _ai_result(sc, algorithm, f"{ALGORITHM_NAME} fracture boxes")


def _ai_result(dataset: Any, algorithm: Algorithm, subject: str) -> Any:
    """IHE AI Results conventions on a built SR / SC (:mod:`paligemma_xray.infer.ai_results`)."""
    from paligemma_xray.infer.ai_results import mark_ai_result

    return mark_ai_result(dataset, algorithm, subject=subject)


# -- an SR that OHIF draws ---------------------------------------------------------------------

SERIES_NUMBER_VIEWER_SR = 7703


def viewer_sr_uids(study_uid: str, sop_uid: str, algorithm: Algorithm, settings: str = "") -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the viewer SR (:func:`build_viewer_sr`).

    Its own series (one per study and model), apart from the full report's: OHIF shows the
    last instance of an SR series, so the two must not share one.
    """
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["pxr-viewer-sr-series", str(study_uid), algorithm.checksum])
    instance = generate_uid(entropy_srcs=["pxr-viewer-sr", str(sop_uid), algorithm.checksum, settings])
    return str(series), str(instance)


def build_viewer_sr(
    source: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    settings: str = "",
    name: str | Path | None = None,
) -> Any | None:
    """A TID 1500 Comprehensive SR of the boxes alone, in the encoding the OHIF viewer draws.

    OHIF (3.x, the viewer OHIF publishes) draws the regions of a TID 1500 report only when
    *every* measurement group has a spatial coordinate: a group without one, such as the
    image-level finding of :func:`build_sr` (TID 1501), stops its SR viewport before it shows
    the image (checked in ``tests/infer/test_dicom_sr_viewer.py`` with OHIF 3.13.2). This
    report therefore holds one planar-ROI group (TID 1410) per box and nothing else: the same
    closed ``POLYLINE`` in the source's pixel coordinates, the same finding code and score,
    the same algorithm and device observer, in its own series (:func:`viewer_sr_uids`,
    series number 7703) beside the full report. The full report stays the record; this one
    is what a radiologist sees drawn on the image without new software.

    Returns ``None`` when there is no box (TID 1500 needs one group; nothing to draw).

    Raises:
        DataError: the source is not DICOM or lacks an attribute the SR needs.
    """
    import highdicom as hd

    ds = read_source(source, name=name)
    if not len(detections):
        return None
    codes = _codes()
    evidence = _evidence(ds)
    boxes = _scale(detections, ds)
    series_uid, sop_uid = viewer_sr_uids(ds.StudyInstanceUID, ds.SOPInstanceUID, algorithm, settings)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=algorithm.parameters
    )
    groups = _box_groups(detections, boxes, sop_uid, _source_ref(ds), algorithm_id, codes, None)
    context = _device_context(algorithm, codes)
    return _measurement_report(
        ds, evidence, context, groups, algorithm, codes,
        uids=(series_uid, sop_uid), series_number=SERIES_NUMBER_VIEWER_SR,
        subject=f"{ALGORITHM_NAME} boxes for viewers",
    )  # fmt: skip


def to_bytes(dataset: Any) -> bytes:
    """A DICOM Part 10 file of ``dataset`` (an SR or SC built here)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (its preamble, or a DICOM suffix)."""
    from paligemma_xray.data.images import is_dicom

    try:
        with Path(path).open("rb") as handle:
            return is_dicom(handle.read(132), path)
    except OSError:
        return False


def build_for_image(
    source: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    calibration: Calibration | None = None,
    settings: str = "",
    sr: bool = True,
    secondary_capture: bool = False,
    image: Any = None,
    name: str | Path | None = None,
    viewer: bool = True,
) -> list[Any]:
    """The DICOM objects that report one source image: its SR, then its Secondary Capture.

    The one builder ``predict --dicom-sr``, the PACS client and the service's
    ``format=dicom-sr`` go through. ``calibration``: the model's (``DetectorLike.calibration``),
    whose probabilities the SR reports beside the scores (none without one); ``sr`` /
    ``secondary_capture``: which objects; ``image``: the decoded source, which the Secondary
    Capture draws on. ``settings`` and ``name`` as for :func:`build_sr`. ``viewer``: after
    the SR, when there are boxes, the same boxes alone as OHIF draws them
    (:func:`build_viewer_sr`, a series of its own).

    Raises:
        DataError: the source is not DICOM or lacks an attribute the SR needs.
    """
    objects = []
    if sr:
        boxes, whole = calibrated(calibration, detections)
        objects.append(
            build_sr(
                source,
                detections,
                algorithm,
                probability=boxes,
                image_probability=whole,
                settings=settings,
                name=name,
            )
        )
        shown = (
            build_viewer_sr(source, detections, algorithm, settings=settings, name=name) if viewer else None
        )
        if shown is not None:  # the boxes as OHIF draws them, in a series of their own
            objects.append(shown)
    if secondary_capture:
        if image is None:
            raise ValueError("a Secondary Capture needs the decoded image")
        objects.append(
            build_secondary_capture(source, image, detections, algorithm, settings=settings, name=name)
        )
    return objects


def write_for_image(
    out_dir: str | Path,
    name: str,
    source: str | Path,
    image: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    calibration: Calibration | None = None,
    settings: str = "",
    sr: bool = True,
    secondary_capture: bool = False,
) -> list[Path]:
    """``predict --dicom-sr``'s files for one image: ``dicom-sr/<name>.sr.dcm``, ``dicom-sc/<name>.sc.dcm``.

    Built by :func:`build_for_image`: with the SR, when there are boxes,
    ``dicom-sr-viewer/<name>.sr.dcm`` (:func:`build_viewer_sr`). Written atomically
    (:mod:`paligemma_xray.atomic`); returns the paths written.
    """
    from paligemma_xray.atomic import write_bytes

    out = Path(out_dir)
    objects = build_for_image(
        source, detections, algorithm, calibration=calibration, settings=settings, sr=sr,
        secondary_capture=secondary_capture, image=image, name=source,
    )  # fmt: skip
    return [
        write_bytes(out / folder / f"{name}.{kind}.dcm", to_bytes(dataset))
        for dataset in objects
        for folder, kind in [_FOLDERS[int(dataset.SeriesNumber)]]
    ]


# Where write_for_image files each object build_for_image returns, by its series number.
_FOLDERS = {
    SERIES_NUMBER_SR: ("dicom-sr", "sr"),
    SERIES_NUMBER_VIEWER_SR: ("dicom-sr-viewer", "sr"),
    SERIES_NUMBER_SC: ("dicom-sc", "sc"),
}
