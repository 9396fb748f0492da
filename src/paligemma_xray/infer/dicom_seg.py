"""Masks as DICOM: a Segmentation (highdicom ``hd.seg.Segmentation``) beside the SR.

For one DICOM source image and Detections that carry masks (``<seg>`` answers decoded with
``--seg-vae``), :func:`build_seg` makes a **binary DICOM SEG** in the source's study:

* one segment per object with a mask, labelled ``<label> <n>`` (``fracture 1`` …), in the
  order of the detections; a "fracture" label is coded SNOMED CT 72704001 "Fracture"
  (morphologic abnormality) under category 49755003 "Morphologically Abnormal Structure",
  another label is the SR's private code (``99PXRAY``, ``dicom_sr.private_code``);
* each segment's algorithm: type AUTOMATIC, the Algorithm Identification (name, family
  "Artificial Intelligence", version, parameters ``model`` and ``sha256`` of the weights);
* the frames reference the source image (its SOP Class and Instance UIDs; the source's
  Study is the SEG's, patient and study attributes copied by highdicom), masks at the
  source's Rows × Columns (rescaled by nearest neighbour if the decoded image differed);
  segments may overlap (``SegmentsOverlap`` says so);
* IHE AI Results conventions (:mod:`paligemma_xray.infer.ai_results`): Contributing
  Equipment "Processing Algorithm", a series description saying it is an AI result.

UIDs are derived like the SR's: one series per (study, model), one instance per (image,
model, settings), so the same run twice gives the same object (a PACS stores it once).
No mask on any object: no SEG (:func:`build_seg` returns None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from paligemma_xray.infer.ai_results import mark_ai_result
from paligemma_xray.infer.dicom_sr import (
    FRACTURE_LABELS,
    MANUFACTURER,
    Algorithm,
    private_code,
    read_source,
)
from paligemma_xray.locations import Detections
from paligemma_xray.masks import decode_rle

SERIES_NUMBER_SEG = 7703  # beside the SR's 7701 and the SC's 7702
SEG_SUFFIX = ".seg.dcm"


def seg_uids(study_uid: str, sop_uid: str, algorithm: Algorithm, settings: str = "") -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of our SEG of image ``sop_uid`` (derived, stable)."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["pxr-seg-series", str(study_uid), algorithm.checksum])
    instance = generate_uid(entropy_srcs=["pxr-seg", str(sop_uid), algorithm.checksum, settings])
    return str(series), str(instance)


def _property(label: str) -> tuple[Any, Any]:
    """(category, type) codes of a segment for the label the model wrote."""
    from pydicom.sr.coding import Code

    category = Code("49755003", "SCT", "Morphologically Abnormal Structure")
    if label.strip().lower() in FRACTURE_LABELS:
        return category, Code("72704001", "SCT", "Fracture")
    return category, private_code(label)


def _full_mask(rle: dict, rows: int, columns: int) -> np.ndarray:
    mask = decode_rle(rle)
    if mask.shape != (rows, columns):
        picture = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(picture.resize((columns, rows), Image.Resampling.NEAREST)) > 127
    return mask


def build_seg(
    source: Any,
    detections: Detections,
    algorithm: Algorithm,
    *,
    settings: str = "",
    name: str | Path | None = None,
) -> Any:
    """The DICOM SEG of ``detections``' masks on ``source`` (path, bytes or Dataset); None if no mask.

    Raises:
        DataError: the source is not DICOM or lacks an attribute a SEG needs.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ds = read_source(source, name=name)
    if not detections.has_masks or detections.masks is None:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters={"model": algorithm.model_id[:64], "sha256": algorithm.checksum},
    )
    planes: list[np.ndarray] = []
    descriptions: list[Any] = []
    for i, rle in enumerate(detections.masks):
        if rle is None:
            continue
        category, kind = _property(detections.class_name[i])
        number = len(descriptions) + 1
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{detections.class_name[i]} {i + 1}"[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
            )
        )
        planes.append(_full_mask(rle, rows, columns))
    pixels = np.stack(planes, axis=-1)[None]  # (frames=1, rows, columns, segments)
    series_uid, sop_uid = seg_uids(ds.StudyInstanceUID, ds.SOPInstanceUID, algorithm, settings)
    seg = hd.seg.Segmentation(
        source_images=[ds],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER_SEG,
        sop_instance_uid=sop_uid,
        instance_number=int(ds.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.checksum[:16],
        content_label="FRACTURES",
        content_description=f"{algorithm.name} masks of {len(descriptions)} object(s)"[:64],
        omit_empty_frames=False,  # a segment whose mask is empty still says the model found it
    )
    if "PatientOrientation" not in seg:  # Type 2C for a projection image: the source's, else empty
        seg.PatientOrientation = ds.get("PatientOrientation") or None
    return mark_ai_result(seg, algorithm, subject=f"{algorithm.name} fracture masks")


def write_seg(
    out_dir: str | Path,
    name: str,
    source: str | Path,
    detections: Detections,
    algorithm: Algorithm,
    *,
    settings: str = "",
) -> Path | None:
    """``predict --dicom-seg``'s file for one image: ``dicom-seg/<name>.seg.dcm`` (None: no mask)."""
    from paligemma_xray.atomic import write_bytes
    from paligemma_xray.infer.dicom_sr import to_bytes

    seg = build_seg(source, detections, algorithm, settings=settings, name=source)
    if seg is None:
        return None
    return write_bytes(Path(out_dir) / "dicom-seg" / f"{name}{SEG_SUFFIX}", to_bytes(seg))
