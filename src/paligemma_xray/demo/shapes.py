"""Synthetic shapes: the generic localisation task the demo's base model is pretrained on.

Real PaliGemma arrives at fine-tuning already able to localise things, because it was
pretrained on detection among many other tasks. The demo's base model gets the same head
start from this task, which has nothing to do with fractures: find circles, squares,
rings, triangles and lines on varied, radiograph-like grey backgrounds (dark field,
smooth gradients, film grain, soft textures, large unlabelled bright bands that objects may
lie on). Each image holds zero to three objects of 6% to 50% of the image side; each prompt
asks for one class, sometimes two (``detect circle ; ring``), so the model learns to read
the class names in its prompt and to answer with nothing when none of the asked-for
objects is present -- as a fracture detector must on a healthy radiograph.

Everything is deterministic for a given seed: example ``i`` of a set seeded ``s`` is drawn
from its own generator seeded ``(s, i)``, so sets of different sizes share their first
examples and any example can be regenerated alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from paligemma_xray.locations import encode

CLASSES: tuple[str, ...] = ("circle", "square", "ring", "triangle", "line")
"""Object classes of the pretraining task, in the order they are listed in prompts."""

DEFAULT_SIZE = 112
"""Side of the generated images in pixels (the demo base model's input resolution)."""

EVAL_SPLIT_SIZE = 128
"""Images in each of the valid and test splits written by :func:`generate`; the rest train."""


@dataclass(frozen=True)
class ShapeExample:
    """One generated image with its prompt and target text."""

    image: Image.Image  # grey ("L"), DEFAULT_SIZE² unless asked otherwise
    prefix: str  # "detect circle ; ring"
    suffix: str  # "<loc…>×4 circle ; …", "" when none of the asked classes is present
    boxes: np.ndarray  # (N, 4) float32 x1 y1 x2 y2 pixels of the objects named in the suffix
    labels: list[str]  # N class names, in suffix order
    scene: list[tuple[str, tuple[float, float, float, float]]]  # every object drawn: class, x1 y1 x2 y2


CLEAN_SHARE = 0.5
"""Share of images on a plain field (level and gradient only, no texture or clutter)."""


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey field with the statistics of a radiograph: dark, smooth, grainy, textured.

    A share :data:`CLEAN_SHARE` of the fields stays plain. Measured with the base model's
    vision tower trained from scratch to regress the first object's centre: 400 steps of 32
    bring the median error to 55 bins on plain fields but only to 153 on textured, cluttered
    ones, so the plain half is what lets the vision features form early; the textured half
    teaches them to ignore clutter.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clean = rng.random() < CLEAN_SHARE
    base = rng.uniform(0.05, 0.35)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(-0.2, 0.2) * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle))
    field = base + gradient
    if clean:
        return field
    # Low-frequency blobs stand in for soft tissue: noise upsampled from a coarse grid.
    coarse = rng.normal(0, 1, (6, 6)).astype(np.float32)
    blobs = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    field = field + rng.uniform(0.0, 0.08) * blobs
    texture = rng.integers(0, 3)
    if texture == 1:  # stripes: a cheap stand-in for trabecular or grid-line texture
        period = rng.uniform(4, 14)
        t_angle = rng.uniform(0, math.pi)
        phase = (xx * math.cos(t_angle) + yy * math.sin(t_angle)) * size / period
        field = field + rng.uniform(0.02, 0.08) * np.sin(2 * math.pi * phase)
    elif texture == 2:  # mottled: medium-frequency noise
        mid = rng.normal(0, 1, (24, 24)).astype(np.float32)
        field = field + rng.uniform(0.02, 0.06) * np.asarray(
            Image.fromarray(mid).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )
    # Unlabelled clutter: wide bright bands crossing the image. Objects drawn over them must
    # still be found (a contrast edge alone is not an object), which is also what a detector
    # of small lesions on large bright structures needs to learn.
    for _ in range(int(rng.choice([0, 0, 0, 1, 2]))):
        b_angle = rng.uniform(0, math.pi)
        offset = rng.uniform(-0.3, 0.3)
        half_width = rng.uniform(0.06, 0.18)
        dist = np.abs((xx - 0.5) * math.sin(b_angle) - (yy - 0.5) * math.cos(b_angle) - offset)
        band = np.clip((half_width - dist) / 0.01, 0, 1)
        field = field + rng.uniform(0.15, 0.45) * band
    return field


# Size range of each class as a fraction of the image side: small enough to include objects
# of a fracture's size (about a tenth of the image), large enough that each stays visible
# after the downscale to the model's resolution (a ring needs room for its hole).
_EXTENT = {
    "circle": (0.06, 0.4),
    "square": (0.06, 0.4),
    "triangle": (0.08, 0.4),
    "ring": (0.12, 0.45),
    "line": (0.1, 0.5),
}


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, size: int):
    """Draw one object on a mask; return its tight box (x1, y1, x2, y2) in pixels."""
    low, high = _EXTENT[kind]
    extent = rng.uniform(low, high) * size
    cx = rng.uniform(extent / 2, size - extent / 2)
    cy = rng.uniform(extent / 2, size - extent / 2)
    r = extent / 2
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        return cx - r, cy - r, cx + r, cy + r
    if kind == "ring":
        width = max(1, int(r * rng.uniform(0.15, 0.35)))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
        return cx - r, cy - r, cx + r, cy + r
    if kind == "square":
        theta = rng.uniform(0, math.pi / 2)
        # Rotated square: half-diagonal r so that every square fits the sampled extent.
        corners = [
            (cx + r * math.cos(theta + k * math.pi / 2), cy + r * math.sin(theta + k * math.pi / 2))
            for k in range(4)
        ]
        draw.polygon(corners, fill=255)
        xs, ys = zip(*corners)
        return min(xs), min(ys), max(xs), max(ys)
    if kind == "triangle":
        theta = rng.uniform(0, 2 * math.pi)
        angles = [theta + k * 2 * math.pi / 3 for k in range(3)]
        corners = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        draw.polygon(corners, fill=255)
        xs, ys = zip(*corners)
        return min(xs), min(ys), max(xs), max(ys)
    if kind == "line":
        theta = rng.uniform(0, math.pi)
        dx, dy = r * math.cos(theta), r * math.sin(theta)
        width = max(1, round(rng.uniform(0.012, 0.035) * size))
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width)
        pad = width / 2
        return (
            min(cx - dx, cx + dx) - pad,
            min(cy - dy, cy + dy) - pad,
            max(cx - dx, cx + dx) + pad,
            max(cy - dy, cy + dy) + pad,
        )
    raise ValueError(f"unknown shape {kind!r}")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two x1 y1 x2 y2 boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_example(seed: int, index: int, size: int = DEFAULT_SIZE) -> ShapeExample:
    """Generate example ``index`` of the set seeded ``seed`` (pure function of both)."""
    rng = np.random.default_rng([seed, index])
    field = _background(rng, size)
    n_objects = int(rng.choice([0, 1, 1, 1, 1, 2, 2, 3]))
    objects: list[tuple[str, tuple[float, float, float, float]]] = []
    for _ in range(n_objects):
        kind = str(rng.choice(CLASSES))
        for _attempt in range(10):  # resample until it overlaps no earlier object much
            mask_img = Image.new("L", (size, size), 0)
            box = _draw_object(ImageDraw.Draw(mask_img), rng, kind, size)
            if all(_iou(box, other) < 0.2 for _, other in objects):
                break
        else:
            continue
        blur = rng.uniform(0.0, 1.2)
        mask = (
            np.asarray(
                mask_img.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.3 else mask_img, dtype=np.float32
            )
            / 255.0
        )
        # Mostly brighter than the background, like bone or metal; sometimes darker, like air.
        contrast = rng.uniform(0.25, 0.6) * (1 if rng.random() < 0.8 else -1)
        field = field + contrast * mask * rng.uniform(0.85, 1.0)
        box = tuple(float(np.clip(v, 0, size)) for v in box)
        objects.append((kind, box))
    field = field + rng.normal(0, rng.uniform(0.01, 0.05), field.shape).astype(np.float32)
    grey = (np.clip(field, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")

    # Ask for one class (sometimes two), usually one that is present: single-class prompts
    # are what fracture detection uses, and "nothing here" stays a common answer.
    present = sorted({kind for kind, _ in objects}, key=CLASSES.index)
    n_asked = 1 if rng.random() < 0.85 else 2
    asked = [str(rng.choice(present if present and rng.random() < 0.9 else CLASSES))]
    if n_asked == 2:
        asked.append(str(rng.choice([c for c in CLASSES if c not in asked])))
    asked.sort(key=CLASSES.index)
    wanted = [(kind, box) for kind, box in objects if kind in asked]
    # A fixed reading order (top to bottom, then left to right) gives the decoder one
    # right answer per image instead of n! permutations.
    wanted.sort(key=lambda item: (item[1][1], item[1][0]))
    boxes = np.array([box for _, box in wanted], dtype=np.float32).reshape(-1, 4)
    labels = [kind for kind, _ in wanted]
    suffix = encode(boxes, labels, (size, size)) if labels else ""
    return ShapeExample(image, "detect " + " ; ".join(asked), suffix, boxes, labels, objects)


def iter_examples(seed: int, start: int, stop: int, size: int = DEFAULT_SIZE) -> Iterator[ShapeExample]:
    """Examples ``start`` (inclusive) to ``stop`` (exclusive) of the set seeded ``seed``."""
    for index in range(start, stop):
        yield make_example(seed, index, size)


def generate(out: str | Path, n: int, seed: int = 0, size: int = DEFAULT_SIZE, progress: bool = True) -> Path:
    """Write ``n`` training examples plus valid and test splits in the Roboflow layout.

    ``out/dataset/_annotations.{train,valid,test}.jsonl`` and the images beside them, as
    :func:`paligemma_xray.data.open_dataset` reads them. Train holds examples ``0..n-1``,
    valid and test the next :data:`EVAL_SPLIT_SIZE` each, so the same seed and ``n`` always
    give the same files. Images are grey PNG (lossless: a re-run is byte-identical).
    Returns ``out``.
    """
    from paligemma_xray.progress import bar as progress_bar

    out = Path(out)
    folder = out / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    k = EVAL_SPLIT_SIZE
    ranges = {"train": (0, n), "valid": (n, n + k), "test": (n + k, n + 2 * k)}
    bar = progress_bar(total=n + 2 * EVAL_SPLIT_SIZE, desc="shapes", unit="img", enabled=progress)
    for split, (start, stop) in ranges.items():
        with open(folder / f"_annotations.{split}.jsonl", "w", encoding="utf-8") as jsonl:
            for index in range(start, stop):
                example = make_example(seed, index, size)
                name = f"shapes_{index:06d}.png"
                example.image.save(folder / name)
                record = {"image": name, "prefix": example.prefix, "suffix": example.suffix}
                jsonl.write(json.dumps(record) + "\n")
                bar.update(1)
    bar.close()
    return out
