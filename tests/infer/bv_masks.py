"""A numpy transcription of big_vision's JAX mask decoder, the independent reference.

It follows big_vision's ``evaluators/proj/paligemma/transfers/segmentation.py`` op by op:
``_get_params`` (each PyTorch kernel transposed to flax's HWIO with ``(2, 3, 1, 0)``),
``_quantized_values_from_codebook_indices``, and the flax ``Decoder`` (NHWC), where
``nn.ConvTranspose(kernel 4, stride 2, padding=2, transpose_kernel=True)`` is
``jax.lax.conv_transpose``: kernel flipped in space and its in/out axes swapped, input
dilated by the stride, padded by (2, 2), then a stride-1 correlation. Nothing of it goes
through torch. ``place`` is big_vision's evaluator placing a 64×64 mask in its box.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _bv_params(checkpoint: dict[str, np.ndarray]) -> dict:
    def transp(kernel):
        return np.transpose(kernel, (2, 3, 1, 0))

    def conv(name):
        return {"bias": checkpoint[name + ".bias"], "kernel": transp(checkpoint[name + ".weight"])}

    def resblock(name):
        return {"Conv_0": conv(name + ".0"), "Conv_1": conv(name + ".2"), "Conv_2": conv(name + ".4")}

    return {
        "_embeddings": checkpoint["_vq_vae._embedding"],
        "Conv_0": conv("decoder.0"),
        "ResBlock_0": resblock("decoder.2.net"),
        "ResBlock_1": resblock("decoder.3.net"),
        "ConvTranspose_0": conv("decoder.4"),
        "ConvTranspose_1": conv("decoder.6"),
        "ConvTranspose_2": conv("decoder.8"),
        "ConvTranspose_3": conv("decoder.10"),
        "Conv_1": conv("decoder.12"),
    }


def _correlate(x: np.ndarray, kernel: np.ndarray, padding: int) -> np.ndarray:
    """lax.conv_general_dilated, NHWC × HWIO, stride 1, symmetric explicit padding."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw, _, out = kernel.shape
    height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], height, width, out), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            y += x[:, dy : dy + height, dx : dx + width, :] @ kernel[dy, dx]
    return y


def _nn_conv(x, p, padding):  # flax nn.Conv(padding=int)
    return _correlate(x, p["kernel"], padding) + p["bias"]


def _nn_conv_transpose(x, p, *, stride=2, padding=2):  # flax nn.ConvTranspose(transpose_kernel=True)
    kernel = p["kernel"][::-1, ::-1].swapaxes(2, 3)  # lax.conv_transpose(transpose_kernel=True)
    n, h, w, c = x.shape
    dilated = np.zeros((n, (h - 1) * stride + 1, (w - 1) * stride + 1, c), x.dtype)
    dilated[:, ::stride, ::stride] = x  # lhs_dilation = strides
    return _correlate(dilated, kernel, padding) + p["bias"]


def _relu(x):
    return np.maximum(x, 0)


def big_vision_reconstruct_masks(checkpoint: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
    """``get_reconstruct_masks('…')(codes)[..., 0]`` in numpy (float64)."""
    params = {k: v for k, v in _bv_params(checkpoint).items()}
    embeddings = params["_embeddings"].astype(np.float64)
    batch, num_tokens = codes.shape
    assert num_tokens == 16
    x = np.take(embeddings, codes.reshape(-1), axis=0).reshape(batch, 4, 4, embeddings.shape[1])
    x = _relu(_nn_conv(x, params["Conv_0"], 0))
    for block in ("ResBlock_0", "ResBlock_1"):
        original = x
        y = _relu(_nn_conv(x, params[block]["Conv_0"], 1))
        y = _relu(_nn_conv(y, params[block]["Conv_1"], 1))
        x = _nn_conv(y, params[block]["Conv_2"], 0) + original
    for i in range(4):
        x = _relu(_nn_conv_transpose(x, params[f"ConvTranspose_{i}"]))
    x = _nn_conv(x, params["Conv_1"], 0)
    return x[..., 0]


def place(mask64: np.ndarray, bins: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """big_vision's evaluator: bbox = tokens / 1023; int() of the scaled corners; PIL bilinear
    resize of the float mask to the box; > 0.0; background elsewhere."""
    y1, x1, y2, x2 = np.array(bins) / 1023
    y1, x1, y2, x2 = map(int, (y1 * height, x1 * width, y2 * height, x2 * width))
    full = np.zeros((height, width), bool)
    if x2 <= x1 or y2 <= y1:
        return full
    resized = Image.fromarray(np.asarray(mask64, np.float32)).resize(
        [x2 - x1, y2 - y1], resample=Image.BILINEAR
    )
    full[y1:y2, x1:x2] = np.asarray(resized) > 0.0
    return full


# -- big_vision's encoder (pp/proj/paligemma/segmentation.py), TensorFlow ops in numpy ---------


def _tf_same_conv(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """tf.nn.conv2d(x, kernel, strides=stride, padding='SAME') + bias, NHWC.

    TensorFlow's SAME: out = ceil(in / stride), pad_total = max((out - 1) * stride + k - in, 0),
    the smaller half before, the larger after; then a strided correlation.
    """
    kh, kw = kernel_hwio.shape[:2]
    pads = []
    for size, k in ((x.shape[1], kh), (x.shape[2], kw)):
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    height = (x.shape[1] - kh) // stride + 1
    width = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], height, width, kernel_hwio.shape[3]), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            patch = x[
                :, dy : dy + stride * (height - 1) + 1 : stride, dx : dx + stride * (width - 1) + 1 : stride
            ]
            y += patch @ kernel_hwio[dy, dx]
    return y + bias


def big_vision_encode(checkpoint: dict[str, np.ndarray], masks: np.ndarray) -> np.ndarray:
    """``encode_to_codebook_indices(checkpoint, masks[..., None])`` in numpy: codes (N, 16)."""

    def conv(x, name, stride=1):
        kernel = np.transpose(checkpoint[name + ".weight"], (2, 3, 1, 0)).astype(np.float64)
        return _tf_same_conv(x, kernel, checkpoint[name + ".bias"], stride)

    x = 2.0 * (masks[..., None].astype(np.float64) - 0.5)
    for n in range(4):
        x = np.maximum(conv(x, f"encoder.{2 * n}", stride=2), 0)
    for n in range(2):
        original = x
        y = np.maximum(conv(x, f"encoder.{8 + n}.net.0"), 0)
        y = np.maximum(conv(y, f"encoder.{8 + n}.net.2"), 0)
        x = conv(y, f"encoder.{8 + n}.net.4") + original
    x = conv(x, "encoder.10")
    embeddings = checkpoint["_vq_vae._embedding"].astype(np.float64)
    flat = x.reshape(-1, embeddings.shape[1])
    distances = (flat**2).sum(1, keepdims=True) + (embeddings**2).sum(1) - 2 * flat @ embeddings.T
    return distances.argmin(1).reshape(-1, 16)
