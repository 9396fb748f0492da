"""Inference: batched greedy decoding with per-token scores, and the ``Detector`` facade.

The decoder and the Detector (and with them torch) are imported on first use, so that the
settings (:mod:`paligemma_xray.infer.settings`, what the command line's parser is built
from) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paligemma_xray.infer.decode import BoxOrStop, DecodeOutput, greedy_decode
    from paligemma_xray.infer.detector import Detector, Generation, is_detection_prompt

_WHERE = {
    "BoxOrStop": "decode",
    "DecodeOutput": "decode",
    "greedy_decode": "decode",
    "Detector": "detector",
    "Generation": "detector",
    "is_detection_prompt": "detector",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"paligemma_xray.infer.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paligemma_xray.infer' has no attribute {name!r}")


__all__ = ["BoxOrStop", "DecodeOutput", "Detector", "Generation", "greedy_decode", "is_detection_prompt"]
