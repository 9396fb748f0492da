"""IHE AI Results (AIR) conventions on every DICOM object we write (SR, SEG, Secondary Capture).

A PACS shows an SR, a SEG or a Secondary Capture among the radiographer's images; the
conventions of IHE's *AI Results* profile (Radiology Technical Framework Supplement, AIR)
make it plain that a machine made it, which one, and that nobody has checked it:

* **Contributing Equipment** (0018,A001): one item for the algorithm, Purpose of Reference
  ``(Newcode1, 99IHE, "Processing Algorithm")`` (AIR's code, pending a DICOM code), with
  Manufacturer, Manufacturer's Model Name (the algorithm's name), Software Versions (the
  tool's version and the SHA-256 of the model's weights, 64 hex digits: one LO value each),
  Device UID (derived from the weights' checksum: the same model is the same device, the
  UID the SR's device observer carries too) and a Contribution Description naming the model
  id and the checksum in full. highdicom's own item (the library, "Processing Equipment")
  and the source's acquisition equipment stay before it.
* **VerificationFlag** ``UNVERIFIED`` on an SR (highdicom's default, kept; checked here).
* **Series Description** ending in a notice that it is an AI result, not for diagnosis:
  ``AI result, not for diagnosis`` unless the environment variable
  ``PALIGEMMA_XRAY_DICOM_NOTICE`` says otherwise (an empty value: no notice). A Series
  Description is a LO (64 characters): the subject is shortened to leave the notice whole.

>>> from pydicom.dataset import Dataset
>>> from paligemma_xray.infer.dicom_sr import Algorithm
>>> ds = Dataset()
>>> _ = mark_ai_result(ds, Algorithm(model_id="runs/r1", checksum="ab" * 32), subject="fracture detection")
>>> ds.SeriesDescription
'fracture detection (AI result, not for diagnosis)'
>>> item = ds.ContributingEquipmentSequence[-1]
>>> item.PurposeOfReferenceCodeSequence[0].CodeMeaning, item.ManufacturerModelName
('Processing Algorithm', 'paligemma-xray')
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paligemma_xray.infer.dicom_sr import Algorithm

NOTICE_ENV = "PALIGEMMA_XRAY_DICOM_NOTICE"
DEFAULT_NOTICE = "AI result, not for diagnosis"
# IHE AIR's Purpose of Reference for the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
_LO = 64  # characters in a DICOM LO value


def notice() -> str:
    """The notice every series description carries (``PALIGEMMA_XRAY_DICOM_NOTICE``, read now)."""
    value = os.environ.get(NOTICE_ENV)
    return DEFAULT_NOTICE if value is None else value.strip()


def series_description(subject: str) -> str:
    """``subject (notice)`` in at most 64 characters, the notice kept whole."""
    text = notice()
    if not text:
        return subject[:_LO]
    tail = f" ({text})"[:_LO]
    return subject[: max(0, _LO - len(tail))].rstrip() + tail


def device_uid(algorithm: Algorithm) -> str:
    """The algorithm's Device UID: one per model weights (the SR's device observer uses it too)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["pxr-device", algorithm.checksum]))


def algorithm_equipment(algorithm: Algorithm) -> Any:
    """The Contributing Equipment item naming the algorithm (IHE AIR, see the module's text)."""
    from pydicom.dataset import Dataset

    from paligemma_xray.infer.dicom_sr import MANUFACTURER

    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = algorithm.name[:_LO]
    item.SoftwareVersions = [algorithm.version[:_LO], algorithm.checksum[:_LO]]
    item.DeviceUID = device_uid(algorithm)
    item.ContributionDescription = (
        f"AI algorithm {algorithm.name} {algorithm.version}; model {algorithm.model_id}; "
        f"weights SHA-256 {algorithm.checksum}"
    )[:1024]  # ST
    return item


def mark_ai_result(dataset: Any, algorithm: Algorithm, *, subject: str) -> Any:
    """Apply the AIR conventions to a built SR / SEG / SC ``dataset``; returns it.

    ``subject``: what the series holds ("fracture detection", "fracture masks" …), the start
    of its Series Description.
    """
    equipment = list(dataset.get("ContributingEquipmentSequence") or [])
    purpose = PROCESSING_ALGORITHM[0]
    equipment = [  # ours replaced, not repeated, when a dataset is marked again
        item
        for item in equipment
        if not any(c.get("CodeValue") == purpose for c in item.get("PurposeOfReferenceCodeSequence", []))
    ]
    equipment.append(algorithm_equipment(algorithm))
    dataset.ContributingEquipmentSequence = equipment
    dataset.SeriesDescription = series_description(subject)
    if "VerificationFlag" in dataset and dataset.VerificationFlag != "UNVERIFIED":
        raise ValueError("an AI result is written UNVERIFIED; nobody has verified this one")
    return dataset
