"""Inference: batched greedy decoding with per-token scores, and the ``Detector`` facade.

``DetectorLike`` is what every caller of a detector relies on (``Detector``, the fused /
test-time-augmented ``FusedDetector``, the service's stand-ins). The torch side (decode,
detector) is imported on first use, so that the torch-free modules of this package
(``calibrated``, ``dicom_sr``) stay light for the report, the service and the PACS client.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy sees; at run time __getattr__ below
    from paligemma_xray.infer.decode import BoxOrStop, DecodeOutput, greedy_decode
    from paligemma_xray.infer.detector import Detector, DetectorLike, Generation, is_detection_prompt

_DECODE = ("BoxOrStop", "DecodeOutput", "greedy_decode")
_DETECTOR = ("Detector", "DetectorLike", "Generation", "is_detection_prompt")


def __getattr__(name: str) -> Any:
    if name in _DECODE:
        from paligemma_xray.infer import decode

        return getattr(decode, name)
    if name in _DETECTOR:
        from paligemma_xray.infer import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'paligemma_xray.infer' has no attribute {name!r}")


__all__ = [
    "BoxOrStop",
    "DecodeOutput",
    "Detector",
    "DetectorLike",
    "Generation",
    "greedy_decode",
    "is_detection_prompt",
]
