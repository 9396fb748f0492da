"""PaliGemma's mask decoder in PyTorch: 16 ``<seg>`` codes → a 64×64 mask.

PaliGemma writes an object's mask as 16 codes of a VQ-VAE (128 codes, a 4×4 grid) trained
on Open Images (arXiv 2301.02229). big_vision decodes them in JAX
(``evaluators/proj/paligemma/transfers/segmentation.py``: ``get_reconstruct_masks``) from
``vae-oid.npz``, a checkpoint that keeps the original PyTorch model's names and layouts:

========================================  ========================  =========================
key                                       shape                     layer
========================================  ========================  =========================
``_vq_vae._embedding``                    (128, D)                  codebook (D = 512)
``decoder.0.{weight,bias}``               (128, D, 1, 1)            1×1 conv, ReLU
``decoder.{2,3}.net.{0,2,4}.*``           (128, 128, 3|3|1, …)      two residual blocks
``decoder.{4,6,8,10}.*``                  (in, out, 4, 4)           transposed convs ×2, ReLU
``decoder.12.*``                          (1, 16, 1, 1)             1×1 conv → the mask
========================================  ========================  =========================

(big_vision's ``pp/proj/paligemma/segmentation.py:refcoco_mask2str`` reads ``encoder.*`` from
the same file to turn ground-truth masks into training codes; the decoder needs none of
them). This module runs that decoder with ``torch.nn.functional`` on the file's own
arrays, untransposed: big_vision transposes each kernel to flax's HWIO and runs
``nn.ConvTranspose(kernel 4, stride 2, padding 2, transpose_kernel=True)``, which is
exactly PyTorch's ``conv_transpose2d(stride=2, padding=1)`` on the original
``(in, out, kh, kw)`` weight. The output equals ``reconstruct_masks`` (before any
threshold) to float32 round-off; ``tests/infer/test_masks.py`` checks it against a numpy
transcription of the JAX code.

The file is read with ``np.load(allow_pickle=False)``; nothing is unpickled.

Example (a random decoder of the real layout):

>>> import tempfile, pathlib, numpy as np
>>> path = write_random_vae(pathlib.Path(tempfile.mkdtemp()) / "vae.npz", seed=0)
>>> decoder = MaskDecoder.load(path)
>>> masks = decoder(np.zeros((3, 16), np.int64))
>>> tuple(masks.shape), str(masks.dtype)
((3, 64, 64), 'torch.float32')
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paligemma_xray.errors import CheckpointError, ConfigError
from paligemma_xray.locations import SEG_CODES, SEG_TOKENS_PER_OBJECT, Detections
from paligemma_xray.masks import encode_rle, place_mask

EMBEDDING_KEY = "_vq_vae._embedding"
GRID = 4  # 16 codes = a 4×4 grid
_RESBLOCKS = ("decoder.2.net", "decoder.3.net")
_UPSAMPLES = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
_CONV_KEYS = (
    "decoder.0",
    *(f"{block}.{i}" for block in _RESBLOCKS for i in (0, 2, 4)),
    *_UPSAMPLES,
    "decoder.12",
)
DECODER_KEYS = (EMBEDDING_KEY, *(f"{c}.{p}" for c in _CONV_KEYS for p in ("weight", "bias")))


def real_layout_shapes(embedding_dim: int = 512) -> dict[str, tuple[int, ...]]:
    """Every array of ``vae-oid.npz`` with its shape: decoder, encoder and codebook.

    The decoder's shapes follow big_vision's ``Decoder`` (128 channels, halved by each of
    the upsampling layers after the first); the encoder's mirror them (4×4 stride-2 convs,
    1 → 16 → 32 → 64 → 128, two residual blocks, a 1×1 conv to the codebook width), as
    big_vision's ``encode_to_codebook_indices`` reads them.
    """
    dim = 128
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING_KEY: (SEG_CODES, embedding_dim)}

    def conv(name: str, weight: tuple[int, ...], out: int) -> None:
        shapes[f"{name}.weight"] = weight
        shapes[f"{name}.bias"] = (out,)

    conv("decoder.0", (dim, embedding_dim, 1, 1), dim)
    for block in _RESBLOCKS:
        conv(f"{block}.0", (dim, dim, 3, 3), dim)
        conv(f"{block}.2", (dim, dim, 3, 3), dim)
        conv(f"{block}.4", (dim, dim, 1, 1), dim)
    channels = dim
    for name in _UPSAMPLES:  # big_vision: features = 128, 64, 32, 16
        conv(name, (channels, dim, 4, 4), dim)
        channels, dim = dim, dim // 2
    conv("decoder.12", (1, channels, 1, 1), 1)
    widths = (1, 16, 32, 64, 128)
    for n in range(4):
        conv(f"encoder.{2 * n}", (widths[n + 1], widths[n], 4, 4), widths[n + 1])
    for block in ("encoder.8.net", "encoder.9.net"):
        conv(f"{block}.0", (128, 128, 3, 3), 128)
        conv(f"{block}.2", (128, 128, 3, 3), 128)
        conv(f"{block}.4", (128, 128, 1, 1), 128)
    conv("encoder.10", (embedding_dim, 128, 1, 1), embedding_dim)
    return shapes


def write_random_vae(path: str | Path, *, seed: int = 0, embedding_dim: int = 512) -> Path:
    """A ``vae-oid.npz`` of the real layout with random weights, for tests and examples.

    Weights are scaled like a trained network's (fan-in), so masks have both signs.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in real_layout_shapes(embedding_dim).items():
        if key == EMBEDDING_KEY:
            arrays[key] = rng.normal(0, 1, shape).astype(np.float32)
        elif key.endswith(".bias"):
            arrays[key] = rng.normal(0, 0.1, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape)) // shape[0 if not _is_transposed(key) else 1]
            arrays[key] = rng.normal(0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32)
    path = Path(path)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _is_transposed(key: str) -> bool:
    return key.rsplit(".", 1)[0] in _UPSAMPLES


def read_vae(path: str | Path) -> dict[str, np.ndarray]:
    """The decoder's arrays of a ``vae-oid.npz`` (no pickle); CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("mask decoder (vae-oid.npz) not found", path=path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = [key for key in DECODER_KEYS if key not in names]
            if missing:
                raise CheckpointError(
                    f"not PaliGemma's mask VQ-VAE (vae-oid.npz): no {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                    path=path,
                )
            arrays = {key: np.asarray(npz[key]) for key in DECODER_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"not a readable .npz file: {error}", path=path) from error
    _check_shapes(arrays, path)
    return arrays


def _check_shapes(arrays: dict[str, np.ndarray], path: Path) -> None:
    embedding = arrays[EMBEDDING_KEY]
    if embedding.ndim != 2 or embedding.shape[0] != SEG_CODES:
        raise CheckpointError(
            f"{EMBEDDING_KEY} has shape {embedding.shape}, expected ({SEG_CODES}, D)", path=path
        )
    expected = real_layout_shapes(embedding.shape[1])
    for key in DECODER_KEYS:
        if tuple(arrays[key].shape) != expected[key]:
            raise CheckpointError(
                f"{key} has shape {tuple(arrays[key].shape)}, expected {expected[key]}", path=path
            )
        if not np.issubdtype(arrays[key].dtype, np.floating):
            raise CheckpointError(f"{key} has dtype {arrays[key].dtype}, expected floating point", path=path)


class MaskDecoder(torch.nn.Module):
    """big_vision's VQ-VAE mask decoder: codes ``(N, 16)`` → float masks ``(N, 64, 64)``.

    Values in about [-1, 1]; big_vision's threshold is ``> 0`` after resizing into the box
    (:func:`paligemma_xray.masks.place_mask`). The weights are buffers (nothing to train),
    so results carry no autograd history and ``np.asarray(decoder(codes))`` works.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, source: str = "vae-oid.npz") -> None:
        super().__init__()
        self.source = source
        for key in DECODER_KEYS:
            self.register_buffer(
                _buffer_name(key), torch.from_numpy(np.asarray(arrays[key], np.float32).copy())
            )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> MaskDecoder:
        """Read ``vae-oid.npz`` as big_vision ships it (CheckpointError, one line, if it is not)."""
        decoder = cls(read_vae(path), source=str(path))
        return decoder.to(device) if device is not None else decoder

    def _w(self, key: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key))

    def _conv(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = self._w(f"{name}.weight")
        return F.conv2d(x, weight, self._w(f"{name}.bias"), padding=weight.shape[-1] // 2)

    def forward(self, codes: Any) -> torch.Tensor:
        """Float masks ``(N, 64, 64)`` for integer ``codes`` ``(N, 16)`` in 0..127 (any int array)."""
        embedding = self._w(EMBEDDING_KEY)
        indices = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        if indices.ndim != 2 or indices.shape[1] != SEG_TOKENS_PER_OBJECT:
            raise ValueError(
                f"codes must have shape (N, {SEG_TOKENS_PER_OBJECT}), got {tuple(indices.shape)}"
            )
        indices = indices.to(device=embedding.device, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= SEG_CODES):
            raise ValueError(f"codes must be in 0..{SEG_CODES - 1}")
        with torch.no_grad():
            # big_vision: take rows, reshape (N, 4, 4, D) row-major; here channels first.
            x = (
                embedding[indices.reshape(-1)]
                .reshape(len(indices), GRID, GRID, embedding.shape[1])
                .permute(0, 3, 1, 2)
            )
            x = F.relu(self._conv(x, "decoder.0"))
            for block in _RESBLOCKS:
                y = F.relu(self._conv(x, f"{block}.0"))
                y = F.relu(self._conv(y, f"{block}.2"))
                x = self._conv(y, f"{block}.4") + x
            for name in _UPSAMPLES:
                x = F.relu(
                    F.conv_transpose2d(
                        x, self._w(f"{name}.weight"), self._w(f"{name}.bias"), stride=2, padding=1
                    )
                )
            x = self._conv(x, "decoder.12")
        return x[:, 0]


def _buffer_name(key: str) -> str:
    return "w_" + key.replace(".", "_")


def decode_masks(decoder: MaskDecoder | None, detections: Detections) -> Detections:
    """``detections`` with ``masks``: each object's ``<seg>`` codes decoded and placed in its box.

    Objects without codes get ``None``. Detections with no codes at all come back as they
    are. Codes without a decoder are a :class:`ConfigError` (the model answered a
    segmentation; the user has to say where ``vae-oid.npz`` is).
    """
    has_codes = np.asarray((detections.seg_codes >= 0).all(axis=1), dtype=bool)
    if not has_codes.any():
        return detections
    if decoder is None:
        raise ConfigError(
            "the model answered with <seg> mask codes; give the mask decoder with --seg-vae vae-oid.npz "
            "(big_vision's gs://big_vision/paligemma/vae-oid.npz)"
        )
    decoded = decoder(detections.seg_codes[has_codes]).cpu().numpy()
    masks: list[dict[str, Any] | None] = []
    rows = iter(decoded)
    for i, coded in enumerate(has_codes.tolist()):
        if coded:
            masks.append(encode_rle(place_mask(next(rows), detections.xyxy[i], detections.image_size)))
        else:
            masks.append(None)
    selected = detections[np.arange(len(detections))]
    selected.masks = masks
    return selected


# -- the encoder: masks → codes (training targets) ------------------------------------------

_ENCODER_CONVS = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")  # stride 2, each + ReLU
_ENCODER_RESBLOCKS = ("encoder.8.net", "encoder.9.net")
ENCODER_KEYS = tuple(
    f"{c}.{p}"
    for c in (
        *_ENCODER_CONVS,
        *(f"{block}.{i}" for block in _ENCODER_RESBLOCKS for i in (0, 2, 4)),
        "encoder.10",
    )
    for p in ("weight", "bias")
)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``padding='SAME'``: (before, after) for one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaskEncoder(torch.nn.Module):
    """big_vision's mask encoder: ``(N, 64, 64)`` masks in [0, 1] → codes ``(N, 16)``.

    What big_vision uses to make ``<seg>`` training targets
    (``pp/proj/paligemma/segmentation.py:encode_to_codebook_indices``, reading ``encoder.*``
    and the codebook from the same ``vae-oid.npz``): ``2 (x - 0.5)``; four stride-2 convs
    (TensorFlow ``SAME`` padding) each + ReLU; two residual blocks; a 1×1 conv to the
    codebook width; per 4×4 cell the nearest codebook row (squared distance, first on ties).
    Kernel sizes are read from the file, not assumed.
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, source: str = "vae-oid.npz") -> None:
        super().__init__()
        self.source = source
        for key in (EMBEDDING_KEY, *ENCODER_KEYS):
            self.register_buffer(
                _buffer_name(key), torch.from_numpy(np.asarray(arrays[key], np.float32).copy())
            )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> MaskEncoder:
        """Read the encoder of ``vae-oid.npz`` (CheckpointError, one line, if it has none)."""
        path = Path(path)
        read_vae(path)  # the file and its decoder/codebook are checked the same way
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ENCODER_KEYS if key not in npz.files]
            if missing:
                raise CheckpointError(
                    f"this vae-oid.npz has no mask encoder ({missing[0]} missing): big_vision makes "
                    "<seg> training targets with encoder.* of the same file",
                    path=path,
                )
            arrays = {key: np.asarray(npz[key]) for key in (EMBEDDING_KEY, *ENCODER_KEYS)}
        for key in ENCODER_KEYS:
            if key.endswith(".weight") and arrays[key].ndim != 4:
                raise CheckpointError(
                    f"{key} has shape {arrays[key].shape}, expected a 4-d kernel", path=path
                )
        if arrays["encoder.10.weight"].shape[0] != arrays[EMBEDDING_KEY].shape[1]:
            raise CheckpointError("encoder.10 does not map to the codebook's width", path=path)
        encoder = cls(arrays, source=str(path))
        return encoder.to(device) if device is not None else encoder

    def _w(self, key: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key))

    def _conv(self, x: torch.Tensor, name: str, stride: int = 1) -> torch.Tensor:
        weight = self._w(f"{name}.weight")
        top, bottom = _same_padding(x.shape[2], weight.shape[2], stride)
        left, right = _same_padding(x.shape[3], weight.shape[3], stride)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, self._w(f"{name}.bias"), stride=stride)

    def forward(self, masks: Any) -> torch.Tensor:
        """Codes ``(N, 16)`` (int64, 0..127) of float masks ``(N, 64, 64)`` in [0, 1]."""
        x = torch.as_tensor(np.asarray(masks, np.float32) if not isinstance(masks, torch.Tensor) else masks)
        if x.ndim != 3 or tuple(x.shape[1:]) != (64, 64):
            raise ValueError(f"masks must have shape (N, 64, 64), got {tuple(x.shape)}")
        embedding = self._w(EMBEDDING_KEY)
        with torch.no_grad():
            x = (2.0 * (x.to(embedding.device, torch.float32) - 0.5))[:, None]
            for name in _ENCODER_CONVS:
                x = F.relu(self._conv(x, name, stride=2))
            for block in _ENCODER_RESBLOCKS:
                y = F.relu(self._conv(x, f"{block}.0"))
                y = F.relu(self._conv(y, f"{block}.2"))
                x = self._conv(y, f"{block}.4") + x
            x = self._conv(x, "encoder.10")
            flat = x.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])  # (N·4·4, D), row-major cells
            distances = (flat**2).sum(1, keepdim=True) + (embedding**2).sum(1) - 2 * flat @ embedding.T
            return distances.argmin(1).reshape(len(x), -1)

    def codes(self, masks: np.ndarray) -> np.ndarray:
        """:meth:`forward` as numpy in and out (what ``data import --seg-vae`` calls)."""
        return self(masks).cpu().numpy()


def encode_masks(encoder: MaskEncoder, detections: Detections) -> Detections:
    """``detections`` whose objects with a mask get ``seg_codes`` from it (training targets)."""
    from paligemma_xray.masks import box_crop64, decode_rle

    if detections.masks is None or not detections.has_masks:
        return detections
    present = [(i, m) for i, m in enumerate(detections.masks) if m is not None]
    rows = [i for i, _ in present]
    crops = np.stack([box_crop64(decode_rle(m), detections.xyxy[i]) for i, m in present])
    codes = encoder(crops).cpu().numpy()
    out = detections[np.arange(len(detections))]
    seg_codes = out.seg_codes.copy()
    seg_codes[rows] = codes
    out.seg_codes = seg_codes.astype(np.int16)
    return out
