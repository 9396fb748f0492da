"""paligemma-xray: fine-tune, evaluate and serve PaliGemma fracture detectors.

Example:
    >>> from paligemma_xray import Detections, encode
    >>> encode([[0, 0, 50, 50]], ["fracture"], (100, 100))
    '<loc0000><loc0000><loc0512><loc0512> fracture'

``paligemma_xray.Detector`` (images in, :class:`Detections` out) is imported on first use,
so that ``import paligemma_xray`` stays light and needs no torch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from paligemma_xray.locations import Detections, encode, parse
from paligemma_xray.version import __version__

# supervision warns on every import without OpenCV; we draw with its NumPy backend on purpose.
warnings.filterwarnings(
    "ignore", message=r"OpenCV \(`opencv-python`\) is not installed", category=UserWarning
)

__all__ = ["Detections", "Detector", "__version__", "encode", "parse"]

if TYPE_CHECKING:
    from paligemma_xray.infer import Detector


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from paligemma_xray.infer import Detector

        return Detector
    raise AttributeError(f"module 'paligemma_xray' has no attribute {name!r}")
