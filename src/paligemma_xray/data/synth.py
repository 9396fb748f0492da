"""Synthetic fracture radiographs: the embedded default data set for the demo and the tests.

Each image is rendered as an X-ray *projection*: the brightness of a pixel grows with the
material a ray crosses on its way, so a long bone (a hollow tube of dense cortex around a
lighter medullary canal) shows two bright cortical walls with a darker canal between them,
inside a grey soft-tissue envelope, on a dark (air) background. Bones end in widened
joint ends with thinner cortex and spongy texture; children's bones carry growth plates
(thin dark bands near the ends that are *not* fractures, so the task is not trivial).

A fracture is a slightly jagged dark gap (:data:`GAP_RANGE`) across one or both cortices,
at any angle, sometimes with the distal fragment displaced. Its box is measured from the
pixels the gap actually removed, so the label always matches what is visible, then widened
by :data:`BOX_MARGIN` bone radii on every side: the box marks the fracture *site*, as
annotators of public fracture sets draw it, not the crack's tight outline.

Everything derives from ``numpy.random.default_rng((seed, index))``: image ``i`` of a seed
is byte-identical whatever ``n`` is, and the whole set is byte-identical for a seed.

Example:
    >>> import tempfile
    >>> from paligemma_xray.data.synth import generate
    >>> root = generate(tempfile.mkdtemp(), n=6, seed=0, size=128, progress=False)
    >>> sorted(p.name for p in (root / "dataset").glob("_annotations.*.jsonl"))
    ['_annotations.test.jsonl', '_annotations.train.jsonl', '_annotations.valid.jsonl']
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from paligemma_xray import atomic
from paligemma_xray.errors import DataError, check_output
from paligemma_xray.locations import DEFAULT_PROMPT, encode
from paligemma_xray.progress import bar as progress_bar

PREFIX = DEFAULT_PROMPT
LABEL = "fracture"
GAP_RANGE = (0.016, 0.032)
"""Width of a fracture's gap as a fraction of the image side (uniform in this range): 3.6 to
7 px on a 224 px image, 1.8 to 3.6 px at the demo model's 112 px input, i.e. a displaced or
distracted fracture. Half as wide, the gap falls under 2 px at 112 px: the demo's small
model, fine-tuned on 24k examples, then reached mAP@0.5 0.21 instead of 0.44 (docs/demo.md)."""
BOX_MARGIN = 0.75
"""Margin around the crack in the fracture's box, in radii of the broken bone. A tight box
around a 1-2 px crack would make IoU >= 0.5 a test of pixel-exact regression rather than of
finding the fracture; a margin that scales with the bone keeps boxes in proportion to the
anatomy (median about a fifth of the image side)."""
DEFAULT_SPLITS: tuple[tuple[str, float], ...] = (("train", 0.7), ("valid", 0.15), ("test", 0.15))


@dataclass
class _Bone:
    """A long bone: straight axis from ``p0`` to ``p1`` (pixels), slightly bowed."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float  # outer shaft radius, pixels
    canal: float  # medullary canal radius as a fraction of the outer radius
    bow: float  # sideways bow of the shaft at mid-length, pixels
    flare: tuple[float, float]  # widening of each end (0 = open end cut by the image border)
    cap: tuple[bool, bool]  # whether each end is a rounded joint end inside the image
    physis: tuple[bool, bool]  # growth plate near each end


@dataclass
class _Fracture:
    bone: int
    t: float  # position along the axis, 0..1
    angle: float  # tilt from the perpendicular of the axis, radians
    complete: bool  # crosses both cortices
    side: float  # +1/-1: which cortex an incomplete fracture starts from
    gap: float  # width of the gap, pixels
    shift: float  # sideways displacement of the distal fragment, pixels
    jag_amp: float
    jag_freq: float
    jag_phase: float


def _frame(bone: _Bone, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axis coordinates of every pixel: t (0..1 along the bone), d (signed distance), unit axis."""
    axis = bone.p1 - bone.p0
    length = float(np.hypot(*axis))
    u = axis / length
    n = np.array([-u[1], u[0]])
    rx, ry = xx - bone.p0[0], yy - bone.p0[1]
    t = (rx * u[0] + ry * u[1]) / length
    # A parabolic bow of the centre line; small enough that the perpendicular stays a good
    # approximation of the distance to it.
    d = rx * n[0] + ry * n[1] - bone.bow * 4.0 * np.clip(t, 0, 1) * (1 - np.clip(t, 0, 1))
    return t, d, np.array([length, *u, *n])


def _bone_density(bone: _Bone, t: np.ndarray, d: np.ndarray, length: float) -> np.ndarray:
    """Projected density of one bone: cortex chord minus canal chord, plus the canal's own."""
    end_zone = 0.11 * length + 2.0 * bone.radius
    # Joint ends widen smoothly towards each end that sits inside the image.
    dist0 = np.clip(t * length / end_zone, 0, None)
    dist1 = np.clip((1 - t) * length / end_zone, 0, None)
    widen = 1.0 + bone.flare[0] * np.exp(-(dist0**2) * 2.5) + bone.flare[1] * np.exp(-(dist1**2) * 2.5)
    outer = bone.radius * widen
    # Rounded caps beyond the ends: an ellipse of the end's radius.
    for cap, dist_out in ((bone.cap[0], -t * length), (bone.cap[1], (t - 1) * length)):
        if cap:
            k = np.clip(dist_out / np.maximum(outer * 0.9, 1e-3), 0, None)
            outer = np.where(dist_out > 0, outer * np.sqrt(np.clip(1 - k**2, 0, 1)), outer)
    # Towards the ends the cortex thins and the canal fills with spongy bone.
    endness = np.clip(np.maximum(np.exp(-(dist0**2) * 1.5), np.exp(-(dist1**2) * 1.5)), 0, 1)
    inner = outer * (bone.canal + (0.9 - bone.canal) * endness)
    chord_out = 2.0 * np.sqrt(np.clip(outer**2 - d**2, 0, None))
    chord_in = 2.0 * np.sqrt(np.clip(inner**2 - d**2, 0, None))
    marrow = 0.18 + 0.35 * endness
    density = (chord_out - chord_in) + marrow * chord_in
    for end, has in enumerate(bone.physis):
        if has:
            # The growth plate: a thin wavy lucent band across the whole width near an end.
            pos = 0.045 if end == 0 else 0.955
            wave = 0.006 * np.sin(d / max(bone.radius, 1.0) * 2.6)
            band = np.exp(-(((t - pos - wave) * length / 1.6) ** 2))
            density = density * (1 - 0.55 * band)
    return density


def _fracture_mask(frac: _Fracture, bone: _Bone, t, d, geom) -> tuple[np.ndarray, np.ndarray]:
    """The gap (0..1 strength) and the side of the fracture line (bool, distal) of each pixel."""
    length = geom[0]
    along = (t - frac.t) * length
    # Coordinates in the fracture line's own frame: `across` is the signed distance to it.
    ca, sa = math.cos(frac.angle), math.sin(frac.angle)
    across = along * ca - d * sa
    lateral = along * sa + d * ca
    across = across + frac.jag_amp * np.sin(lateral * frac.jag_freq + frac.jag_phase)
    reach = bone.radius * 1.25 / max(ca, 0.3)
    extent = np.abs(lateral) <= reach
    if not frac.complete:
        # An incomplete (greenstick-like) crack enters from one cortex and stops past the middle.
        extent &= lateral * frac.side >= -0.15 * reach
    gap = np.clip(1.0 - (np.abs(across) - frac.gap / 2) / 1.2, 0, 1) * extent
    return gap, (across > 0)


def _scene(rng: np.random.Generator, size: int) -> list[_Bone]:
    """Lay out one to three long bones the way common radiograph views show them."""
    s = float(size)
    kind = rng.choice(["pair", "joint", "single"], p=[0.4, 0.35, 0.25])
    theta = rng.uniform(0, math.pi)
    u = np.array([math.cos(theta), math.sin(theta)])
    n = np.array([-u[1], u[0]])
    centre = np.array([s / 2, s / 2]) + rng.uniform(-0.08, 0.08, 2) * s
    child = bool(rng.random() < 0.3)
    bones: list[_Bone] = []

    def long_bone(mid, half, radius, flare, cap, physis=(False, False)) -> _Bone:
        return _Bone(
            p0=mid - u * half[0],
            p1=mid + u * half[1],
            radius=radius,
            canal=rng.uniform(0.5, 0.66),
            bow=rng.uniform(-0.02, 0.02) * s,
            flare=flare,
            cap=cap,
            physis=physis,
        )

    if kind == "pair":
        # Forearm or lower leg: two roughly parallel bones, one thinner, a joint end inside.
        r_big = rng.uniform(0.045, 0.065) * s
        r_small = r_big * rng.uniform(0.55, 0.8)
        spacing = (r_big + r_small) * rng.uniform(1.3, 1.9)
        end_in = rng.uniform(0.28, 0.4) * s
        flare = (0.0, rng.uniform(0.4, 0.8))
        bones.append(
            long_bone(
                centre + n * spacing / 2, (0.9 * s, end_in), r_big, flare, (False, True), (False, child)
            )
        )
        bones.append(
            long_bone(
                centre - n * spacing / 2,
                (0.9 * s, end_in * rng.uniform(0.9, 1.05)),
                r_small,
                (0.0, flare[1] * 0.8),
                (False, True),
                (False, child),
            )
        )
    elif kind == "joint":
        # Knee or elbow: a long bone ends in a condyle, a second one starts after the joint gap.
        r = rng.uniform(0.06, 0.085) * s
        r2 = r * rng.uniform(0.8, 1.0)
        flare1, flare2 = rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8)
        joint = centre + u * rng.uniform(0.0, 0.15) * s
        bones.append(
            long_bone(
                joint - u * 0.5 * s, (0.6 * s, 0.5 * s), r, (0.0, flare1), (False, True), (False, child)
            )
        )
        bend = rng.uniform(-0.5, 0.5)
        u2 = np.array([math.cos(theta + bend), math.sin(theta + bend)])
        # Both rounded ends reach 0.9 x their widened radius past their end point; the
        # joint space between them stays visible.
        gap = rng.uniform(0.015, 0.03) * s + 0.9 * r * (1 + flare1) + 0.9 * r2 * (1 + flare2)
        p0 = joint + u2 * gap
        bones.append(
            _Bone(
                p0=p0,
                p1=p0 + u2 * 1.2 * s,
                radius=r2,
                canal=rng.uniform(0.5, 0.66),
                bow=rng.uniform(-0.015, 0.015) * s,
                flare=(flare2, 0.0),
                cap=(True, False),
                physis=(child, False),
            )
        )
    else:
        # A single shaft across the image (humerus, femur, tibia in a long view).
        r = rng.uniform(0.05, 0.08) * s
        flare = (0.0, rng.uniform(0.3, 0.7)) if rng.random() < 0.6 else (0.0, 0.0)
        bones.append(
            long_bone(
                centre,
                (0.9 * s, 0.9 * s if flare[1] == 0 else rng.uniform(0.3, 0.42) * s),
                r,
                flare,
                (False, flare[1] > 0),
                (False, child and flare[1] > 0),
            )
        )
    return bones


def _visible_t(bone: _Bone, size: int) -> tuple[float, float] | None:
    """The range of axis positions whose shaft lies well inside the image, if any."""
    ts = np.linspace(0.06, 0.94, 89)
    pts = bone.p0[None, :] + ts[:, None] * (bone.p1 - bone.p0)[None, :]
    margin = bone.radius * 1.8 + 0.04 * size
    inside = np.all((pts > margin) & (pts < size - margin), axis=1)
    # Keep away from the joint ends: fractures of the spongy ends look different.
    inside &= (ts > 0.12) if bone.cap[0] else True
    inside &= (ts < 0.85) if bone.cap[1] else True
    if not inside.any():
        return None
    idx = np.flatnonzero(inside)
    return float(ts[idx[0]]), float(ts[idx[-1]])


def _marker(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A lead side marker ("L"/"R"), as radiographers tape on the cassette."""
    letter = "L" if rng.random() < 0.5 else "R"
    box = max(int(size * 0.07), 8)
    img = Image.new("L", (box, box), 0)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=int(box * 0.8))
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        font = ImageFont.load_default()
    draw.text((box * 0.15, 0), letter, fill=255, font=font)
    corner = (int(rng.uniform(0.03, 0.12) * size), int(rng.uniform(0.03, 0.12) * size))
    if rng.random() < 0.5:
        corner = (size - box - corner[0], corner[1])
    return np.asarray(img, dtype=np.float32) / 255.0, corner


def render(seed: int, index: int, size: int = 448, fracture_rate: float = 0.75):
    """Render one radiograph: ``(PIL.Image L, boxes_xyxy (N,4) float, labels)``.

    ``index`` selects the image within a seed; the result depends on nothing else.

    Example:
        >>> image, boxes, labels = render(seed=1, index=3, size=96)
        >>> image.size, boxes.shape[1], set(labels) <= {"fracture"}
        ((96, 96), 4, True)
    """
    rng = np.random.default_rng((int(seed), int(index)))
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    bones = _scene(rng, s)

    # Decide the fractures: ~25% negatives, ~20% of positives with two (on two bones).
    candidates = [(i, _visible_t(b, s)) for i, b in enumerate(bones)]
    candidates = [(i, r) for i, r in candidates if r is not None]
    n_frac = 0
    if candidates and rng.random() < fracture_rate:
        n_frac = 2 if (len(candidates) > 1 and rng.random() < 0.25) else 1
    chosen = rng.permutation(len(candidates))[:n_frac] if candidates else []
    fractures: list[_Fracture] = []
    for c in chosen:
        bone_i, (lo, hi) = candidates[int(c)]
        r = bones[bone_i].radius
        fractures.append(
            _Fracture(
                bone=bone_i,
                t=float(rng.uniform(lo, hi)),
                angle=float(rng.uniform(-0.8, 0.8)),
                complete=bool(rng.random() < 0.7),
                side=float(rng.choice([-1.0, 1.0])),
                gap=float(max(rng.uniform(*GAP_RANGE) * s, 1.5)),
                shift=float(rng.uniform(0.0, 0.35) * r if rng.random() < 0.5 else 0.0),
                jag_amp=float(rng.uniform(0.3, 1.2) * max(s / 448, 0.5)),
                jag_freq=float(rng.uniform(0.15, 0.5) * 448 / s),
                jag_phase=float(rng.uniform(0, 6.3)),
            )
        )

    bone_total = np.zeros((s, s), np.float32)
    soft_total = np.zeros((s, s), np.float32)
    spongy = np.zeros((s, s), np.float32)
    boxes: list[list[float]] = []
    for i, bone in enumerate(bones):
        t, d, geom = _frame(bone, xx, yy)
        length = float(geom[0])
        frac = next((f for f in fractures if f.bone == i), None)
        # Soft tissue: a thick envelope around the bone with a soft skin edge; the envelopes
        # of neighbouring bones merge (maximum) instead of stacking into a visible step.
        soft_r = bone.radius * rng.uniform(2.6, 3.6)
        soft_total = np.maximum(soft_total, np.sqrt(np.clip(1 - (d / soft_r) ** 2, 0, None)))
        if frac is not None and frac.shift:
            # The distal fragment slides sideways: sample the bone at shifted coordinates there.
            _, side = _fracture_mask(frac, bone, t, d, geom)
            d = np.where(side, d - frac.shift, d)
        density = _bone_density(bone, t, d, length)
        if frac is not None:
            gap, _ = _fracture_mask(frac, bone, t, d, geom)
            removed = gap * (density > 0.15 * bone.radius)
            density = density * (1 - 0.85 * gap)
            ys, xs = np.nonzero(removed > 0.3)
            if len(xs):
                pad = frac.gap + BOX_MARGIN * bone.radius
                boxes.append(
                    [
                        max(float(xs.min()) - pad, 0.0),
                        max(float(ys.min()) - pad, 0.0),
                        min(float(xs.max()) + 1 + pad, float(s)),
                        min(float(ys.max()) + 1 + pad, float(s)),
                    ]
                )
        # Overlapping bones add up, as they do on film.
        bone_total += density / bone.radius
        spongy = np.maximum(spongy, (density > 0) * (1.0 if bone.cap[0] or bone.cap[1] else 0.6))

    # Trabecular texture: fine low-pass noise modulating the bone, subtle in the shaft.
    texture = ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), 0.9 * s / 448 + 0.5)
    bone_total *= 1 + 0.35 * texture * spongy
    # Large-scale unevenness of the soft tissue (muscle and fat layers).
    # (A coarse noise grid upsampled: as smooth as a wide blur, at a fraction of its cost.)
    coarse = Image.fromarray(rng.standard_normal((10, 10)).astype(np.float32), mode="F")
    lumps = np.asarray(coarse.resize((s, s), Image.BICUBIC), dtype=np.float32)
    soft_total *= 1 + 0.12 * lumps

    atten = soft_total * rng.uniform(0.35, 0.55) + bone_total * rng.uniform(0.4, 0.6)
    img = 1 - np.exp(-atten)
    # Exposure: gain, gamma, heel effect (a gradient across the image) and vignetting.
    heel = 1 + rng.uniform(-0.15, 0.15) * ((xx if rng.random() < 0.5 else yy) / s - 0.5)
    r2 = ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s / 2) ** 2
    vignette = 1 - rng.uniform(0.05, 0.25) * r2
    img = img * heel * vignette
    img = img / max(float(np.percentile(img, 99.5)), 1e-3) * rng.uniform(0.82, 0.97)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.4)
    img = rng.uniform(0.02, 0.09) + img * (1 - 0.1)
    if rng.random() < 0.6:
        mark, (mx, my) = _marker(rng, s)
        h, w = mark.shape
        img[my : my + h, mx : mx + w] = np.maximum(img[my : my + h, mx : mx + w], mark * 0.95)
    img = ndimage.gaussian_filter(img, rng.uniform(0.4, 1.0) * s / 448 + 0.2)
    # Quantum noise: stronger where fewer photons arrive (the darker film areas).
    noise_sd = rng.uniform(0.01, 0.03)
    img = img + rng.standard_normal((s, s)).astype(np.float32) * noise_sd * (0.6 + 0.6 * (1 - img))
    pixels = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return Image.fromarray(pixels, mode="L"), boxes_arr, [LABEL] * len(boxes_arr)


def _split_names(n: int, splits: Sequence[tuple[str, float]], seed: int) -> list[str]:
    """Assign each index a split with exact proportions (rounded) and a seeded shuffle."""
    total = sum(w for _, w in splits)
    counts = [round(n * w / total) for _, w in splits]
    counts[0] += n - sum(counts)
    names = [name for (name, _), c in zip(splits, counts) for _ in range(c)]
    order = np.random.default_rng((int(seed), 2**31 - 1)).permutation(n)
    return [names[i] for i in order]


def generate(
    out: str | Path,
    n: int = 200,
    seed: int = 0,
    *,
    size: int = 448,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    image_format: str = "jpg",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` synthetic radiographs in the Roboflow "paligemma" layout; returns ``out``.

    An existing ``out/dataset`` is refused unless ``overwrite``, which replaces it whole
    (never merged with the new set). The set is written to a temporary folder renamed when
    complete, so a full disk leaves the previous set, or nothing, under ``out/dataset``.

    ``out/dataset/_annotations.{split}.jsonl`` lists ``{"image", "prefix", "suffix"}``
    per image (prefix ``"detect fracture"``, empty suffix for a negative image); the
    images sit beside them. Same ``seed`` and arguments → the same bytes.

    Example:
        >>> import tempfile, json, pathlib
        >>> root = generate(tempfile.mkdtemp(), n=4, seed=3, size=96, progress=False)
        >>> line = (root / "dataset" / "_annotations.train.jsonl").read_text().splitlines()[0]
        >>> sorted(json.loads(line))
        ['image', 'prefix', 'suffix']
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise DataError(f"--size must be at least 32 pixels, got {size}")
    if image_format not in ("jpg", "png"):
        raise DataError(f"image format must be 'jpg' or 'png', got {image_format!r}")
    if not splits or any(w < 0 for _, w in splits) or sum(w for _, w in splits) <= 0:
        raise DataError(f"split ratios must be non-negative and not all zero: {list(splits)}")
    root = check_output(out, folder=True)
    atomic.check_fresh(root / "dataset", overwrite=overwrite, what="data set")
    with atomic.staged_dir(root / "dataset") as folder:
        _write_set(folder, n, seed, size, splits, image_format, progress)
    return root


def _write_set(folder: Path, n: int, seed: int, size: int, splits, image_format: str, progress: bool) -> None:
    assigned = _split_names(n, splits, seed)
    lines: dict[str, list[str]] = {name: [] for name, _ in splits}
    for i in progress_bar(range(n), desc="synth", unit="img", enabled=progress):
        image, boxes, labels = render(seed, i, size)
        name = f"xray_{seed}_{i:05d}.{image_format}"
        buf = io.BytesIO()
        if image_format == "jpg":
            image.save(buf, format="JPEG", quality=92)
        else:
            image.save(buf, format="PNG")
        (folder / name).write_bytes(buf.getvalue())
        suffix = encode(boxes, labels, (size, size)) if len(boxes) else ""
        lines[assigned[i]].append(json.dumps({"image": name, "prefix": PREFIX, "suffix": suffix}))
    for split, rows in lines.items():
        text = "".join(row + "\n" for row in rows)
        (folder / f"_annotations.{split}.jsonl").write_text(text, encoding="utf-8")
