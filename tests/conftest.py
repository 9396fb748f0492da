"""Shared fixtures: everything a test needs is built here, nothing is downloaded.

Expensive objects (tiny models, tokenizers, synthetic data sets) are built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Several engineers and CI share two cores; one intra-op thread per test process keeps the
# parallel suite from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small synthetic fracture set (24 images, 224 px, seed 0) in the Roboflow layout.

    Returns the data set root: ``root/dataset/_annotations.{train,valid,test}.jsonl``.
    Treat it as read-only; it is shared by the whole session.
    """
    from paligemma_xray.data.synth import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n=24, seed=0, size=224, progress=False)


# --- model fixtures (tiny PaliGemma 1/2, tokenizer, checkpoint files); see paligemma_xray.model.tiny


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """The tiny SentencePiece model (640 base pieces, then 1024 loc + 128 seg; <image> = 1792)."""
    from paligemma_xray.model.tiny import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def real_tokenizer_path(tmp_path_factory) -> Path:
    """A SentencePiece model with the real ``paligemma_tokenizer.model``'s layout (257,152 pieces).

    pad 0, eos 1, bos 2, unk 3, a small trained BPE vocabulary padded with unused pieces to
    256,000, ``<loc0000>``.. at 256000, ``<seg000>``.. at 257024 (built in about a second).
    """
    from paligemma_xray.model.tiny import real_layout_tokenizer

    return real_layout_tokenizer(tmp_path_factory.mktemp("real_tokenizer") / "paligemma_tokenizer.model")


@pytest.fixture(scope="session")
def tiny_model_v1():
    """(model, processor): a random tiny PaliGemma 1 (Gemma), float32, eval mode, 28 px, 4 image tokens.

    Shared by the session: don't modify it in place (copy.deepcopy it first).
    """
    from paligemma_xray.model.tiny import tiny_model

    return tiny_model(version=1, seed=0)


@pytest.fixture(scope="session")
def tiny_model_v2():
    """(model, processor): a random tiny PaliGemma 2 (Gemma 2), float32, eval mode. Read-only."""
    from paligemma_xray.model.tiny import tiny_model

    return tiny_model(version=2, seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A saved tiny PaliGemma 1 HF folder (model + processor + tokenizer.model). Read-only."""
    from paligemma_xray.model.tiny import write_tiny_hf

    return write_tiny_hf(tmp_path_factory.mktemp("tiny_hf") / "hf", version=1, seed=0)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> tuple[Path, Path]:
    """(npz path, tokenizer path): a random tiny big_vision PaliGemma 1 checkpoint, float32. Read-only."""
    from paligemma_xray.model.tiny import write_tiny_npz

    return write_tiny_npz(tmp_path_factory.mktemp("tiny_npz") / "tiny.npz", version=1, dtype="float32")


# Boxes the `tiny_boxes_hf_dir` model answers with, normalised x1 y1 x2 y2 (any image).
TINY_BOXES = ((0.3, 0.2, 0.7, 0.6), (0.1, 0.65, 0.45, 0.9))


@pytest.fixture(scope="session")
def tiny_boxes_hf_dir(tmp_path_factory) -> Path:
    """A tiny PaliGemma 1 HF folder taught to answer ``detect fracture`` with two boxes.

    A random tiny model stops at once (no boxes), which leaves nothing to draw or count in
    end-to-end tests. This one is fitted for 60 Adam steps (~1-2 s on CPU) on four noise
    images to answer the two boxes of ``TINY_BOXES`` (the second one on 3 of 4 images, so
    its score comes out lower). The boxes do not depend on the image. Read-only.
    """
    import numpy as np
    import torch
    from PIL import Image

    from paligemma_xray.locations import encode
    from paligemma_xray.model import build_batch, save_hf
    from paligemma_xray.model.tiny import tiny_model

    torch.manual_seed(0)
    model, processor = tiny_model(version=1, seed=0)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 255, (128, 96), dtype=np.uint8) for _ in range(4)]
    images = [Image.fromarray(array).convert("RGB") for array in noise]
    both = encode(list(TINY_BOXES), ["fracture"] * 2, (1, 1))
    first = encode(list(TINY_BOXES[:1]), ["fracture"], (1, 1))
    batch = build_batch(processor, images, ["detect fracture"] * 4, [both, both, both, first])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return save_hf(model, processor, tmp_path_factory.mktemp("tiny_boxes_hf") / "hf")


@pytest.fixture(scope="session")
def tiny_boxes() -> tuple[tuple[float, float, float, float], ...]:
    """The normalised boxes (x1, y1, x2, y2) that ``tiny_boxes_hf_dir`` answers with."""
    return TINY_BOXES


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts with the process's thread count, whatever the previous one set.

    Float sums depend on the number of threads: a test that changed it in a worker process
    (the demo sets its recipe's count) made the next tests' results depend on test order.
    """
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
