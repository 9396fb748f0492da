"""``POST /v1/detect?format=dicom-sr``: the detections of a DICOM upload as a DICOM SR.

The same object ``predict --dicom-sr`` writes (:mod:`paligemma_xray.infer.dicom_sr`), for the
same model, image, prompt and threshold: same content, same SOP Instance UID.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from fastapi.responses import Response

from paligemma_xray.errors import DataError
from paligemma_xray.locations import Detections
from paligemma_xray.serve.uploads import ApiError

if TYPE_CHECKING:
    from paligemma_xray.infer.detector import DetectorLike

FORMATS = ("json", "dicom-sr")


def parse_format(raw: str | None) -> str:
    """The ``format`` query parameter: ``json`` (default) or ``dicom-sr``."""
    value = (raw or "json").strip().lower()
    if value not in FORMATS:
        raise ApiError(422, "bad_field", f"format must be one of {', '.join(FORMATS)}, got {value[:40]!r}")
    return value


def check_sr_input(output: str, kind: str) -> None:
    """Refuse a non-DICOM upload for ``format=dicom-sr`` before the model runs (415)."""
    if output == "dicom-sr" and kind != "dicom":
        raise ApiError(415, "not_dicom", "format=dicom-sr needs a DICOM upload (the SR references its UIDs)")


def sr_response(
    detector: DetectorLike,
    data: bytes,
    filename: str | None,
    kind: str,
    detections: Detections,
    prompt: str,
    threshold: float | None,
) -> Response:
    """The SR bytes (``application/dicom``) for an uploaded DICOM image; 415/422 otherwise."""
    from paligemma_xray.infer import dicom_sr

    check_sr_input("dicom-sr", kind)
    if threshold is not None and detections.score is not None:
        detections = detections[np.asarray(detections.score) >= threshold]
    try:
        (report,) = dicom_sr.build_for_image(
            data,
            detections,
            dicom_sr.algorithm_of(detector),
            calibration=detector.calibration,
            settings=dicom_sr.settings_key(prompt, threshold),
            name=filename or "upload",
            viewer=False,  # one object answers the request: the full report
        )
    except DataError as error:
        raise ApiError(422, "bad_dicom", str(error)) from error
    name = re.sub(r"[^A-Za-z0-9._-]", "_", (filename or "image").rsplit("/", 1)[-1])[:100]
    return Response(
        dicom_sr.to_bytes(report),
        media_type="application/dicom",
        headers={"Content-Disposition": f'attachment; filename="{name}.sr.dcm"'},
    )
