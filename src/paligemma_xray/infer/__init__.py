"""Inference: batched greedy decoding with per-token scores, and the ``Detector`` facade."""

from paligemma_xray.infer.decode import BoxOrStop, DecodeOutput, greedy_decode
from paligemma_xray.infer.detector import Detector, Generation, is_detection_prompt

__all__ = ["BoxOrStop", "DecodeOutput", "Detector", "Generation", "greedy_decode", "is_detection_prompt"]
