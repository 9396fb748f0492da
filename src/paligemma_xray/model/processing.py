"""THE one place for prompts, attention/loss masks and pixels.

Every part of the project that feeds the model (training, decoding, the service) builds its
inputs here, so that training and inference cannot drift apart.

Layout of one example (big_vision's prefix-LM)::

    <image>×N  <bos> prefix "\\n"  |  suffix <eos>   [<pad>…]
    token_type_ids:   0 … 0        |  1 … 1          0 …
    labels:        -100 … -100     |  ids            -100 …

Image and prompt attend to each other fully, the suffix causally; in transformers 5 that
mask follows ``token_type_ids`` alone, so always pass them to the model.

Example:

>>> from PIL import Image
>>> from paligemma_xray.model.tiny import tiny_model
>>> model, processor = tiny_model(version=1)
>>> image = Image.new("RGB", (64, 48))
>>> suffix = "<loc0001><loc0002><loc0003><loc0004> fracture"
>>> batch = build_batch(processor, [image], ["detect fracture"], [suffix])
>>> sorted(batch)
['attention_mask', 'input_ids', 'labels', 'pixel_values', 'token_type_ids']
>>> loss = model(**batch).loss
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PaliGemmaProcessor, PreTrainedTokenizerBase
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from paligemma_xray.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def make_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int = 14
) -> PaliGemmaProcessor:
    """A transformers ``PaliGemmaProcessor`` for ``image_size`` px square images.

    Its image processor resizes bilinearly (PIL's bilinear is antialiased, like big_vision) and
    maps pixels to [-1, 1]; :func:`preprocess_images` is the one we use ourselves, the HF one
    is kept so that ``save_pretrained``/``AutoProcessor`` round-trip.
    """
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_seq_length=(image_size // patch_size) ** 2,
    )
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def image_resolution(processor: PaliGemmaProcessor) -> int:
    """Square input resolution in pixels the processor's model expects."""
    size = processor.image_processor.size
    height = size["height"] if isinstance(size, dict) else size.height
    return int(height)


def preprocess_images(images: Sequence[Image.Image | np.ndarray], resolution: int) -> torch.Tensor:
    """Images → float32 tensor (B, 3, R, R) in [-1, 1], the way big_vision does it.

    big_vision resizes with ``tf.image.resize(method="bilinear", antialias=True)`` straight to
    the square resolution (no aspect-ratio padding) and maps [0, 255] to [-1, 1]; torch's
    antialiased bilinear interpolation is the same triangle filter.

    >>> from PIL import Image
    >>> preprocess_images([Image.new("L", (30, 20), 255)], 28).shape
    torch.Size([1, 3, 28, 28])
    """
    out = torch.empty((len(images), 3, resolution, resolution), dtype=torch.float32)
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        else:
            array = np.asarray(image, dtype=np.float32)
            if array.ndim == 2:  # grayscale radiograph: replicate into RGB like PIL's convert
                array = np.repeat(array[:, :, None], 3, axis=2)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ConfigError(f"image {i}: expected (H, W, 3) or (H, W) pixels, got shape {array.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        if pixels.shape[-2:] != (resolution, resolution):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
            )
        out[i] = (pixels[0] / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return out


def build_batch(
    processor: PaliGemmaProcessor,
    images: Sequence[Image.Image | np.ndarray] | torch.Tensor,
    prefixes: Sequence[str],
    suffixes: Sequence[str] | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize prompts (and targets) and preprocess images into one model batch.

    With ``suffixes`` (training / scoring): right-padded ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (0 image+prompt, 1 suffix+EOS), ``labels`` (-100 off the suffix+EOS),
    ``pixel_values``. Without (decoding): the same minus ``labels``, LEFT-padded so that every
    row's next token goes at the end; use :func:`position_ids` for a hand-written decoding loop.

    ``max_length`` counts text tokens after the image tokens (big_vision's ``seqlen``, the
    recipe's "text length"). Only suffixes are ever cut (together with their EOS, as big_vision
    does, so the model is not taught to stop mid-answer); each cut is logged as a warning. A
    prompt longer than ``max_length`` raises :class:`ConfigError`.

    ``images`` may also be an already preprocessed (B, 3, R, R) tensor.
    """
    tokenizer = processor.tokenizer
    if len(images) != len(prefixes):
        raise ConfigError(f"{len(images)} images for {len(prefixes)} prefixes")
    if suffixes is not None and len(suffixes) != len(prefixes):
        raise ConfigError(f"{len(suffixes)} suffixes for {len(prefixes)} prefixes")
    resolution = image_resolution(processor)
    if isinstance(images, torch.Tensor):
        if tuple(images.shape[1:]) != (3, resolution, resolution):
            raise ConfigError(
                f"pixel tensor of shape {tuple(images.shape)}, expected (B, 3, {resolution}, {resolution})"
            )
        pixel_values = images.to(torch.float32)
    else:
        pixel_values = preprocess_images(images, resolution)

    image_part = [processor.image_token_id] * processor.image_seq_length + [tokenizer.bos_token_id]
    # "\n" ends the prompt; it is a piece of its own so encoding prefix+"\n" together equals
    # what PaliGemmaProcessor does with its whole string.
    prompt_ids = tokenizer([p + "\n" for p in prefixes], add_special_tokens=False)["input_ids"]
    prompts = [image_part + ids for ids in prompt_ids]
    text_budget = None if max_length is None else max_length + processor.image_seq_length
    if text_budget is not None:
        for i, prompt in enumerate(prompts):
            if len(prompt) > text_budget:
                raise ConfigError(
                    f"example {i}: the prompt alone takes "
                    f"{len(prompt) - processor.image_seq_length} text tokens, "
                    f"more than max_length={max_length}; prompts are never truncated"
                )

    if suffixes is None:
        return _pad_left(prompts, pixel_values, tokenizer.pad_token_id)

    targets = tokenizer(list(suffixes), add_special_tokens=False)["input_ids"]
    targets = [[*ids, tokenizer.eos_token_id] for ids in targets]
    if text_budget is not None:
        cut = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            room = text_budget - len(prompt)
            if len(target) > room:
                cut.append(f"{i} ({len(target) - room} of {len(target)} tokens)")
                targets[i] = target[:room]
        if cut:
            logger.warning("max_length=%d: suffix truncated in example(s) %s", max_length, ", ".join(cut))
    return pad_right(prompts, targets, pixel_values, tokenizer.pad_token_id)


def pad_right(
    prompts: Sequence[list[int]], targets: Sequence[list[int]], pixel_values: torch.Tensor, pad_id: int
) -> dict[str, torch.Tensor]:
    """Token ids of prompts (image tokens, BOS, prefix, "\\n") and targets (suffix, EOS) as
    :func:`build_batch`'s right-padded training batch: the loss mask is built here only."""
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        n_prompt, n = len(prompt), len(prompt) + len(target)
        input_ids[i, :n] = torch.tensor(prompt + target, dtype=torch.long)
        attention_mask[i, :n] = 1
        token_type_ids[i, n_prompt:n] = 1
        labels[i, n_prompt:n] = input_ids[i, n_prompt:n]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": labels,
        "pixel_values": pixel_values,
    }


def _pad_left(prompts, pixel_values, pad_id) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros((batch, width), dtype=torch.long),
        "pixel_values": pixel_values,
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-based positions that skip left padding, as transformers' PaliGemma numbers tokens.

    Without explicit ``position_ids`` the model numbers columns 1..T, which shifts every
    left-padded row; ``generate`` fixes that itself, a hand-written loop must pass these.

    >>> position_ids(torch.tensor([[0, 1, 1], [1, 1, 1]])).tolist()
    [[1, 1, 2], [1, 2, 3]]
    """
    return attention_mask.long().cumsum(-1).clamp(min=1)
