"""Prompts, masks and pixels: build_batch equals transformers' PaliGemmaProcessor."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_xray.errors import ConfigError
from paligemma_xray.model.processing import (
    IGNORE_INDEX,
    build_batch,
    position_ids,
    preprocess_images,
)

PREFIXES = ["detect fracture", "detect fracture ; dislocation", "caption en"]
SUFFIXES = [
    "<loc0390><loc0241><loc0472><loc0440> fracture",
    "<loc0001><loc0002><loc0003><loc0004> fracture ; <loc0100><loc0200><loc0300><loc0400> dislocation",
    "",  # a negative image: the target is EOS alone
]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(40, 30), (28, 28), (64, 50)]
    ]


@pytest.fixture(scope="module")
def processor(tiny_model_v1):
    return tiny_model_v1[1]


def _hf(processor, images, prefixes, suffixes=None, padding_side="right"):
    tokenizer = processor.tokenizer
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return processor(
            text=["<image>" + p for p in prefixes],
            images=images,
            suffix=suffixes,
            return_tensors="pt",
            padding="longest",
        )
    finally:
        tokenizer.padding_side = old


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_example_equals_paligemma_processor(processor, images, index):
    ours = build_batch(
        processor, images[index : index + 1], PREFIXES[index : index + 1], SUFFIXES[index : index + 1]
    )
    theirs = _hf(
        processor, images[index : index + 1], PREFIXES[index : index + 1], SUFFIXES[index : index + 1]
    )
    for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_right_padded_batch_equals_paligemma_processor(processor, images):
    ours = build_batch(processor, images, PREFIXES, SUFFIXES)
    theirs = _hf(processor, images, PREFIXES, SUFFIXES, padding_side="right")
    for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_left_padded_prompt_batch_equals_paligemma_processor(processor, images):
    ours = build_batch(processor, images, PREFIXES)
    theirs = _hf(processor, images, PREFIXES, padding_side="left")
    assert "labels" not in ours
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    # every row ends with the prompt's "\n": the next token is appended at the same column
    newline = processor.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert (ours["input_ids"][:, -1] == newline).all()


def test_prompt_layout(processor, images):
    batch = build_batch(
        processor, images[:1], ["detect fracture"], ["<loc0001><loc0002><loc0003><loc0004> fracture"]
    )
    ids = batch["input_ids"][0].tolist()
    n = processor.image_seq_length
    tok = processor.tokenizer
    assert ids[:n] == [processor.image_token_id] * n
    assert ids[n] == tok.bos_token_id
    prompt = tok.encode("detect fracture\n", add_special_tokens=False)
    suffix = tok.encode("<loc0001><loc0002><loc0003><loc0004> fracture", add_special_tokens=False)
    assert ids[n + 1 :] == prompt + suffix + [tok.eos_token_id]
    types = batch["token_type_ids"][0].tolist()
    assert types == [0] * (n + 1 + len(prompt)) + [1] * (len(suffix) + 1)
    labels = batch["labels"][0]
    assert (labels[batch["token_type_ids"][0] == 0] == IGNORE_INDEX).all()
    assert labels[-1] == tok.eos_token_id


def test_labels_only_on_suffix_and_eos(processor, images):
    batch = build_batch(processor, images, PREFIXES, SUFFIXES)
    on = batch["labels"] != IGNORE_INDEX
    assert torch.equal(on, (batch["token_type_ids"] == 1) & (batch["attention_mask"] == 1))
    assert torch.equal(batch["labels"][on], batch["input_ids"][on])
    assert on.sum(1).tolist()[2] == 1  # the empty suffix still trains EOS


def test_truncation_cuts_only_the_suffix_and_reports_it(processor, images, caplog):
    full = build_batch(processor, images[:2], PREFIXES[:2], SUFFIXES[:2])
    prompt_lengths = (full["token_type_ids"] == 0).logical_and(full["attention_mask"] == 1).sum(1)
    max_length = int(prompt_lengths.max()) - processor.image_seq_length + 3
    with caplog.at_level(logging.WARNING, logger="paligemma_xray.model.processing"):
        cut = build_batch(processor, images[:2], PREFIXES[:2], SUFFIXES[:2], max_length=max_length)
    assert "truncated" in caplog.text
    assert cut["input_ids"].shape[1] == max_length + processor.image_seq_length
    for row in range(2):
        n_prompt = int(prompt_lengths[row])
        # the image and the prompt are intact
        assert torch.equal(cut["input_ids"][row, :n_prompt], full["input_ids"][row, :n_prompt])
        assert (cut["token_type_ids"][row, :n_prompt] == 0).all()


def test_no_warning_when_everything_fits(processor, images, caplog):
    with caplog.at_level(logging.WARNING, logger="paligemma_xray.model.processing"):
        build_batch(processor, images, PREFIXES, SUFFIXES, max_length=128)
    assert "truncated" not in caplog.text


def test_a_prompt_longer_than_max_length_is_an_error(processor, images):
    with pytest.raises(ConfigError, match="never truncated"):
        build_batch(processor, images[:1], ["detect " + "fracture " * 20], ["x"], max_length=8)


def test_mismatched_lengths_are_errors(processor, images):
    with pytest.raises(ConfigError):
        build_batch(processor, images, PREFIXES[:2])
    with pytest.raises(ConfigError):
        build_batch(processor, images, PREFIXES, SUFFIXES[:1])


def test_preprocess_range_and_resolution():
    black, white = Image.new("RGB", (50, 30), 0), Image.new("L", (20, 70), 255)
    pixels = preprocess_images([black, white], 28)
    assert pixels.shape == (2, 3, 28, 28) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0], torch.tensor(-1.0), atol=1e-5)
    assert torch.allclose(pixels[1], torch.tensor(1.0), atol=1e-5)


def test_preprocess_at_resolution_is_the_exact_affine_map():
    array = np.arange(28 * 28 * 3, dtype=np.uint8).reshape(28, 28, 3)
    pixels = preprocess_images([Image.fromarray(array)], 28)
    expected = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(pixels[0], expected)


def test_preprocess_resize_is_antialiased_bilinear():
    # PIL's BILINEAR resize is the antialiased triangle filter big_vision uses (tf antialias=True).
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    ours = preprocess_images([image], 28)[0]
    reference = np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(ours, torch.from_numpy(reference).permute(2, 0, 1), atol=2.5 / 127.5)


def test_pixel_values_match_processor_resolution(processor, images):
    batch = build_batch(processor, images, PREFIXES)
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    same = build_batch(processor, batch["pixel_values"], PREFIXES)
    assert torch.equal(same["pixel_values"], batch["pixel_values"])


def test_position_ids_skip_left_padding(processor, images, tiny_model_v1):
    model = tiny_model_v1[0]
    batch = build_batch(processor, images[:2], PREFIXES[:2])
    single = build_batch(processor, images[1:2], PREFIXES[1:2])
    with torch.no_grad():
        padded = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits[1, -1]
        alone = model(**single).logits[0, -1]
    assert torch.allclose(padded, alone, atol=1e-5)
