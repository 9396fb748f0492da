"""The one synthetic DICOM builder of the test suite (``from dicom_builder import write_dicom``).

``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there (pytest's default
``prepend`` import mode), so every test folder imports this module alike.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def build_dataset(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    modality: str = "DX",
    sop_class: str = SecondaryCaptureImageStorage,
    **attributes: Any,
) -> Dataset:
    """A DICOM dataset with its file meta holding ``pixels`` (2-D, or frames × rows × columns;
    ``None``: no pixel data); ``attributes`` set further elements by keyword."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(
    target: str | Path | None,
    pixels: np.ndarray | None,
    **options: Any,
) -> Any:
    """A DICOM Part 10 file from :func:`build_dataset` (same options), written to ``target``
    (returns the path) or, with ``target=None``, returned as bytes."""
    ds = build_dataset(pixels, **options)
    if target is None:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    ds.save_as(target, enforce_file_format=True)
    return Path(target)
