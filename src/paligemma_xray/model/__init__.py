"""PaliGemma checkpoints (big_vision ``.npz`` ⇄ Hugging Face), tokenizer, prompts, tiny models.

Usage (with big_vision weights downloaded; :mod:`paligemma_xray.model.tiny` builds test-sized ones)::

    from paligemma_xray.model import load, save_hf, save_npz
    model, processor = load("paligemma-3b-pt-224.f16.npz")
"""

from paligemma_xray.model.checkpoints import cast, load, load_lora, save_hf, save_lora, save_npz
from paligemma_xray.model.processing import build_batch, make_processor, position_ids, preprocess_images
from paligemma_xray.model.tokenizer import load_tokenizer

__all__ = [
    "build_batch",
    "cast",
    "load",
    "load_lora",
    "load_tokenizer",
    "make_processor",
    "position_ids",
    "preprocess_images",
    "save_hf",
    "save_lora",
    "save_npz",
]
