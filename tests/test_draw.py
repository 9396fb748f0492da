"""Drawing detections: where the pixels change, thumbnails, data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from paligemma_xray.draw import annotate, draw_boxes, fit, jpeg_data_uri
from paligemma_xray.locations import encode, parse


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return (np.asarray(before) != np.asarray(after)).any(axis=2)


def test_boxes_are_drawn_where_they_are_and_nowhere_else() -> None:
    image = Image.new("RGB", (200, 120), (40, 40, 40))
    found = parse(encode([[50, 30, 150, 90]], ["fracture"], image.size), image.size)
    drawn = annotate(image, found)
    changed = _changed(image, drawn)
    assert drawn.size == image.size and changed[30, 100] and changed[60, 50]  # top and left edges
    assert not changed[60, 100]  # the inside stays the X-ray
    assert not changed[110, 10]  # far outside too
    assert np.asarray(image).max() == 40  # the input is not drawn on


def test_corners_only_leaves_the_middle_of_each_side() -> None:
    image = Image.new("RGB", (200, 200))
    full = _changed(image, draw_boxes(image, [[20, 20, 180, 180]], thickness=2))
    corners = _changed(image, draw_boxes(image, [[20, 20, 180, 180]], thickness=2, corners_only=True))
    assert full[100, 20] and not corners[100, 20]  # middle of the left side
    assert corners[20, 22] and corners[22, 20]  # the top-left corner


def test_fit_shrinks_but_never_enlarges_and_the_uri_is_a_jpeg() -> None:
    small, scale = fit(Image.new("RGB", (300, 100)), 60)
    assert small.size == (60, 20) and scale == 0.2
    same, scale = fit(Image.new("RGB", (30, 10)), 60)
    assert same.size == (30, 10) and scale == 1.0
    uri = jpeg_data_uri(small)
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert uri.startswith("data:image/jpeg;base64,") and decoded.format == "JPEG" and decoded.size == (60, 20)
