"""Pictures of detections: boxes drawn with supervision's annotators, thumbnails, data URIs.

The one place that draws boxes and masks on images, for every output that shows them:
``predict``'s annotated PNGs, ``data check``'s gallery, the HTML report's gallery and the
service's preview. Masks (``Detections.masks``, COCO RLE) are filled with supervision's
``MaskAnnotator`` under the boxes. No torch (the data layer uses it).

>>> from PIL import Image
>>> from paligemma_xray.locations import parse
>>> found = parse("<loc0100><loc0100><loc0500><loc0500> fracture", (200, 100))
>>> annotate(Image.new("RGB", (200, 100)), found).size
(200, 100)
>>> jpeg_data_uri(fit(Image.new("RGB", (2000, 1000)), 100)[0]).startswith("data:image/jpeg;base64,")
True
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from paligemma_xray.locations import Detections
from paligemma_xray.masks import Rle, decode_rle

Colour = tuple[int, int, int]
DEFAULT_COLOUR: Colour = (230, 119, 0)  # orange: visible on grey radiographs


def _supervision() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # supervision may warn once about optional packages
        import supervision as sv
    return sv


def fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """``image`` shrunk so that its longer side is at most ``max_side`` (never enlarged), and the scale."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def jpeg_data_uri(image: Image.Image, quality: int = 85) -> str:
    """``image`` as a ``data:image/jpeg;base64,…`` URI, for self-contained HTML and JSON."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def draw_boxes(
    image: Image.Image,
    boxes_xyxy: Any,
    *,
    labels: Sequence[str] | None = None,
    colour: Colour = DEFAULT_COLOUR,
    thickness: int | None = None,
    text_scale: float | None = None,
    corners_only: bool = False,
) -> Image.Image:
    """A copy of ``image`` with ``boxes_xyxy`` (pixels, (N, 4)) drawn in one ``colour``.

    ``labels``: one caption per box; ``thickness`` and ``text_scale`` default to sizes that
    read at the image's size; ``corners_only`` marks boxes by their corners (the report's
    false alarms), so that they stand apart from full boxes.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    frame = np.asarray(image.convert("RGB")).copy()
    if not len(boxes):
        return Image.fromarray(frame)
    sv = _supervision()
    detections = sv.Detections(xyxy=boxes, class_id=np.zeros(len(boxes), dtype=int))
    colour_lookup = sv.Color(*colour)
    width = thickness or max(2, round(max(image.size) / 300))
    if corners_only:
        box_annotator = sv.BoxCornerAnnotator(color=colour_lookup, thickness=width)
    else:
        box_annotator = sv.BoxAnnotator(color=colour_lookup, thickness=width)
    frame = box_annotator.annotate(frame, detections)
    if labels is not None:
        label_annotator = sv.LabelAnnotator(
            color=colour_lookup, text_scale=text_scale or max(0.4, max(image.size) / 1200), text_padding=3
        )
        frame = label_annotator.annotate(frame, detections, labels=list(labels))
    return Image.fromarray(frame)


def box_labels(detections: Detections) -> list[str]:
    """``label score`` per box (``label`` alone for ground truth, which has no scores)."""
    scores = detections.score if detections.score is not None else [None] * len(detections)
    return [
        f"{name} {score:.2f}" if score is not None else name
        for name, score in zip(detections.class_name, scores)
    ]


def draw_masks(
    image: Image.Image,
    masks: Sequence[Rle | None],
    *,
    colour: Colour = DEFAULT_COLOUR,
    opacity: float = 0.4,
) -> Image.Image:
    """A copy of ``image`` with each mask (COCO RLE over the whole image; None: none) filled in."""
    frame = np.asarray(image.convert("RGB")).copy()
    present = [decode_rle(m) for m in masks if m is not None]
    if not present:
        return Image.fromarray(frame)
    stack = np.stack(present)
    if stack.shape[1:] != frame.shape[:2]:  # masks of the original, drawn on a smaller picture
        stack = np.stack(
            [np.asarray(Image.fromarray(m).resize(image.size, Image.Resampling.NEAREST)) for m in stack]
        )
    sv = _supervision()
    boxes = np.array([_mask_box(m) for m in stack], dtype=np.float32)
    detections = sv.Detections(xyxy=boxes, mask=stack.astype(bool), class_id=np.zeros(len(stack), dtype=int))
    annotator = sv.MaskAnnotator(color=sv.Color(*colour), opacity=opacity)
    return Image.fromarray(annotator.annotate(frame, detections))


def mask_png_data_uri(rle: Rle, *, colour: Colour = DEFAULT_COLOUR, alpha: int = 110) -> str:
    """One mask as a ``data:image/png`` URI the size of its image: ``colour`` at ``alpha`` on the
    mask, transparent elsewhere (a two-colour palette PNG), for a page to lay over the picture."""
    mask = decode_rle(rle).astype(np.uint8)
    picture = Image.fromarray(mask, mode="L").convert("P")
    picture.putpalette([0, 0, 0, *colour])
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", transparency=bytes([0, alpha]), optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _mask_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def annotate(image: Image.Image, detections: Detections, *, colour: Colour = DEFAULT_COLOUR) -> Image.Image:
    """The image with every mask (where there are any), box and ``label score`` caption."""
    if detections.has_masks and detections.masks is not None:
        image = draw_masks(image, detections.masks, colour=colour)
    return draw_boxes(image, detections.xyxy, labels=box_labels(detections), colour=colour)
