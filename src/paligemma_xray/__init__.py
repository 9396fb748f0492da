"""paligemma-xray: fine-tune, evaluate and serve PaliGemma fracture detectors."""

__version__ = "0.1.0"
