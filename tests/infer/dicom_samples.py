"""Synthetic radiographs written as DICOM (CR/DX; MONOCHROME1 and 2; uncompressed, RLE, JPEG-LS).

Each file has the patient/study attributes a real one has, so the SR tests can check that
they are copied; ``radiograph`` can leave any of them out to test the errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_builder import build_dataset  # tests/ is on the path (its conftest)
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def pixels(width: int, height: int, seed: int, *, monochrome1: bool = False) -> np.ndarray:
    """12-bit 'radiograph': a dark field and a bright bone band with a darker crack."""
    rng = np.random.default_rng(seed)
    field = rng.normal(500, 60, (height, width))
    field[:, width // 3 : 2 * width // 3] = 3000
    field[height // 2 : height // 2 + 2, width // 3 : 2 * width // 3] = 1200
    values = field.clip(0, 4095).astype(np.uint16)
    return (4095 - values).astype(np.uint16) if monochrome1 else values


def radiograph(
    path: Path,
    *,
    study_uid: str | None = None,
    modality: str = "CR",
    width: int = 96,
    height: int = 128,
    seed: int = 0,
    monochrome1: bool = False,
    compression: str | None = None,  # None, "rle", "jpegls"
    drop: tuple[str, ...] = (),
    patient_id: str = "PX0001",
    **attrs,
) -> Path:
    """Write one radiograph; returns ``path``."""
    ds = build_dataset(
        pixels(width, height, seed, monochrome1=monochrome1),
        photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
        modality=modality,
        sop_class=CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE,
    )
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Phantom^Wrist"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = f"ACC{seed:04d}"
    ds.StudyID = "1"
    ds.StudyDate = "20260105"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Doctor^Referring"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1 + seed
    for key, value in attrs.items():
        setattr(ds, key, value)
    if compression == "rle":
        ds.compress(RLELossless)
    elif compression == "jpegls":
        ds.compress(JPEGLSLossless)
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return path


def study(folder: Path, n: int = 3, seed: int = 0, modality: str = "CR") -> list[Path]:
    """One study of ``n`` radiographs in ``folder``: MONOCHROME2, MONOCHROME1, compressed…"""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    kinds = [
        {"monochrome1": False, "compression": None},
        {"monochrome1": True, "compression": None},
        {"monochrome1": False, "compression": "rle"},
        {"monochrome1": True, "compression": "jpegls"},
    ]
    return [
        radiograph(
            folder / f"im{seed + i}.dcm",
            study_uid=uid,
            modality=modality,
            seed=seed + i,
            width=96 + 8 * i,
            height=128 - 8 * i,
            patient_id=f"PX{seed:04d}",
            **kinds[i % len(kinds)],
        )
        for i in range(n)
    ]
