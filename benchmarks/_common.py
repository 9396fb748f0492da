"""What every benchmark script shares: the real PaliGemma shapes and the JSON result writer.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path

from paligemma_xray.model.bigvision import Dims

TEXT_VOCAB = 257152  # SentencePiece pieces; <image> = 257152; HF embedding padded to 257216

# PaliGemma 1 3B at 224 px (paligemma-3b-pt-224): Gemma 2B decoder, SigLIP So400m/14.
PALIGEMMA1_3B_224 = Dims(
    version=1,
    vocab=TEXT_VOCAB,
    width=2048,
    depth=18,
    heads=8,
    kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    vision_width=1152,
    vision_depth=27,
    vision_heads=16,
    vision_mlp_dim=4304,
    patch=14,
    image_size=224,
)


def write_result(result: dict, out: Path | None) -> None:
    """Print the result as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
