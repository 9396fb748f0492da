"""The embedded demo: a small pretrained PaliGemma fine-tuned to find synthetic fractures on a CPU.

- :mod:`~paligemma_xray.demo.shapes` — the generic localisation task the base model is
  pretrained on (shapes, not fractures);
- :mod:`~paligemma_xray.demo.base` — the base model: architecture, initialisation,
  :func:`pretrain` (``paligemma-xray demo pretrain``), :func:`shipped_base`;
- :mod:`~paligemma_xray.demo.run` — :func:`run_demo` (``paligemma-xray demo``).
"""

from paligemma_xray.demo.base import PretrainSettings, PretrainSummary, pretrain, shipped_base
from paligemma_xray.demo.run import DemoSettings, format_summary, run_demo

__all__ = [
    "DemoSettings",
    "PretrainSettings",
    "PretrainSummary",
    "format_summary",
    "pretrain",
    "run_demo",
    "shipped_base",
]
