"""Object masks on images: placing a decoded 64×64 mask in its box, COCO RLE. No torch.

PaliGemma answers a ``segment …`` prompt with a box and 16 ``<segNNN>`` codes per object;
the VQ-VAE decoder (:mod:`paligemma_xray.infer.masks`) turns the codes into a 64×64 float
mask in [-1, 1]. This module puts that mask on the image exactly as big_vision's
segmentation evaluator does (``evaluators/proj/paligemma/transfers/segmentation.py``):

* the box, normalised (``loc / 1023``), is scaled to the image and each coordinate
  truncated with ``int()``: ``x1, y1, x2, y2 = int(x1 * w), int(y1 * h), …``;
* the float 64×64 mask is resized to the box's ``(x2 - x1, y2 - y1)`` with PIL's bilinear
  filter (mode ``F``), then thresholded at ``> 0.0`` (the decoder's output is in [-1, 1]);
* everything outside the box is background; an empty box gives an empty mask.

Masks travel as COCO run-length encodings (``{"size": [h, w], "counts": str}``), through the
maintained mask utilities of faster-coco-eval (pycocotools' API): compact in JSON and in
memory, and what COCO's ``segm`` evaluation reads.

>>> import numpy as np
>>> mask64 = np.full((64, 64), -1.0, np.float32)
>>> mask64[:, 32:] = 1.0                       # right half of the box
>>> mask = place_mask(mask64, (10, 0, 30, 20), (40, 20))
>>> mask.shape, int(mask.sum()), bool(mask[5, 25]), bool(mask[5, 15])
((20, 40), 200, True, False)
>>> rle = encode_rle(mask)
>>> rle["size"], int(rle_area(rle)), bool((decode_rle(rle) == mask).all())
([20, 40], 200, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

MASK_SIZE = 64  # the VQ-VAE decoder's output side
MASK_THRESHOLD = 0.0  # big_vision: ``mi > 0.0`` (decoder output in [-1, 1])

Rle = dict[str, Any]  # {"size": [height, width], "counts": str}


def _mask_utils() -> Any:
    from faster_coco_eval.core import mask as mask_utils

    return mask_utils


def box_pixels(box_xyxy: Sequence[float]) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` truncated with ``int()``, big_vision's pixel box for a mask."""
    x1, y1, x2, y2 = (int(float(v)) for v in box_xyxy)
    return x1, y1, x2, y2


def box_mask(mask64: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray | None:
    """The float mask resized to its pixel box (PIL bilinear, mode ``F``); None for an empty box."""
    x1, y1, x2, y2 = box_pixels(box_xyxy)
    if x2 <= x1 or y2 <= y1:
        return None
    resized = Image.fromarray(np.asarray(mask64, np.float32)).resize(
        (x2 - x1, y2 - y1), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(resized, np.float32)


def place_mask(mask64: np.ndarray, box_xyxy: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """A ``(height, width)`` bool mask of the image: ``mask64`` resized into its box, ``> 0``.

    ``box_xyxy`` is in the image's pixels (as :class:`~paligemma_xray.locations.Detections`
    hold it: ``loc / 1023 × size``); ``image_size`` is ``(width, height)``. The part of the
    box outside the image (not produced by the codec, which clips) is cut off.
    """
    width, height = int(image_size[0]), int(image_size[1])
    full = np.zeros((height, width), dtype=bool)
    inside = box_mask(mask64, box_xyxy)
    if inside is None:
        return full
    x1, y1, x2, y2 = box_pixels(box_xyxy)
    region = inside > MASK_THRESHOLD
    # Clip to the image (a box from the codec never leaves it; a hand-made one might).
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if cx2 > cx1 and cy2 > cy1:
        full[cy1:cy2, cx1:cx2] = region[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]
    return full


def box_crop64(mask: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
    """The mask encoder's input for one object, as big_vision's ``refcoco_mask2str`` makes it.

    The image's mask cropped to the box (corners rounded half to even, as ``tf.round``),
    resized to 64×64 with an antialiased bilinear filter (PIL's, mode ``F``; TensorFlow's
    ``resize(antialias=True)`` in big_vision), in [0, 1].
    """
    height, width = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    rx1, ry1 = int(np.round(x1)), int(np.round(y1))
    rx2, ry2 = int(np.round(x2)), int(np.round(y2))
    crop = np.asarray(mask, np.float32)[max(ry1, 0) : min(ry2, height), max(rx1, 0) : min(rx2, width)]
    if crop.size == 0:
        return np.zeros((64, 64), np.float32)
    resized = Image.fromarray(crop).resize((64, 64), resample=Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def encode_rle(mask: np.ndarray) -> Rle:
    """COCO's compressed RLE of a ``(height, width)`` bool mask, JSON-ready (``counts`` a str)."""
    encoded = _mask_utils().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    counts = encoded["counts"]
    return {
        "size": [int(v) for v in encoded["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def decode_rle(rle: Rle) -> np.ndarray:
    """The ``(height, width)`` bool mask of a COCO RLE (compressed or not)."""
    utils = _mask_utils()
    if isinstance(rle.get("counts"), list):  # uncompressed RLE (COCO ground truth may use it)
        height, width = rle["size"]
        rle = utils.frPyObjects(rle, height, width)
    counts = rle["counts"]
    compressed = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return np.asarray(utils.decode(compressed), dtype=bool)


def rle_area(rle: Rle) -> int:
    """Pixels in the mask of ``rle``."""
    return int(decode_rle(rle).sum())


def polygons_to_rle(polygons: Sequence[Sequence[float]], image_size: tuple[int, int]) -> Rle:
    """COCO polygons (``[[x, y, x, y, …], …]`` in pixels) as one RLE over ``image_size`` (w, h)."""
    utils = _mask_utils()
    width, height = int(image_size[0]), int(image_size[1])
    parts = utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    merged = utils.merge(parts) if isinstance(parts, list) else parts
    return encode_rle(np.asarray(utils.decode(merged), dtype=bool))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two bool masks (0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2 * int(np.logical_and(a, b).sum()) / total if total else 0.0
