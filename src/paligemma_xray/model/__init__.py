"""PaliGemma checkpoints (big_vision ``.npz`` ⇄ Hugging Face), tokenizer, prompts, tiny models.

Usage (with big_vision weights downloaded; :mod:`paligemma_xray.model.tiny` builds test-sized ones)::

    from paligemma_xray.model import load, save_hf, save_npz
    model, processor = load("paligemma-3b-pt-224.f16.npz")

Which form a checkpoint path is (and every marker file name) is :mod:`.forms`'s alone; it
imports no torch, and neither does importing this package: the names below load their
module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paligemma_xray.model.converting import convert
    from paligemma_xray.model.forms import check_checkpoint, identify
    from paligemma_xray.model.loading import cast, load, load_lora, stored_dtype
    from paligemma_xray.model.processing import build_batch, make_processor, position_ids, preprocess_images
    from paligemma_xray.model.saving import save_hf, save_lora, save_npz
    from paligemma_xray.model.tokenizer import load_tokenizer

_HOMES = {
    "build_batch": "processing",
    "cast": "loading",
    "check_checkpoint": "forms",
    "convert": "converting",
    "identify": "forms",
    "load": "loading",
    "load_lora": "loading",
    "load_tokenizer": "tokenizer",
    "make_processor": "processing",
    "position_ids": "processing",
    "preprocess_images": "processing",
    "save_hf": "saving",
    "save_lora": "saving",
    "save_npz": "saving",
    "stored_dtype": "loading",
}

__all__ = [
    "build_batch",
    "cast",
    "check_checkpoint",
    "convert",
    "identify",
    "load",
    "load_lora",
    "load_tokenizer",
    "make_processor",
    "position_ids",
    "preprocess_images",
    "save_hf",
    "save_lora",
    "save_npz",
    "stored_dtype",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
