"""Inference: batched greedy decoding with per-token scores, and the ``Detector`` facade.

``DetectorLike`` is what every caller of a detector relies on (``Detector``, the fused /
test-time-augmented ``FusedDetector``, the service's stand-ins). The decoder and the Detector
(and with them torch) are imported on first use, so that the torch-free modules of this
package (``settings``, what the command line's parser is built from; ``calibrated``,
``dicom_sr``) stay light for the parser, the report, the service and the PACS client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paligemma_xray.infer.decode import BoxOrStop, DecodeOutput, greedy_decode
    from paligemma_xray.infer.detector import Detector, DetectorLike, Generation, is_detection_prompt

_WHERE = {
    "BoxOrStop": "decode",
    "DecodeOutput": "decode",
    "greedy_decode": "decode",
    "Detector": "detector",
    "DetectorLike": "detector",
    "Generation": "detector",
    "is_detection_prompt": "detector",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"paligemma_xray.infer.{_WHERE[name]}"), name)
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
