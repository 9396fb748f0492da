"""``paligemma-xray data check``: is this data set fit to train and evaluate on?

Reads the set (any layout :func:`~paligemma_xray.data.open_dataset` knows), decodes every
image and reports:

* per split: images, boxes, negatives (empty suffix), classes, box sizes, image sizes;
* every problem with its file and 1-based line: lines the reader refused (bad JSON,
  missing keys, missing images, malformed suffixes, out-of-range or inverted boxes,
  labels outside the prefix's classes) and images that do not decode;
* leakage across splits: identical files (SHA-256), near-duplicates (perceptual hash,
  also under flips and 90° rotations, the augmentations that make a ``flip_…`` copy of a
  training radiograph land in the test split), and copies of one source image by name
  (``flip_``/``rot_`` prefixes, Roboflow's ``.rf.<hash>`` names).

Output: a readable summary, JSON for programs, and a self-contained HTML page with a
gallery of examples with their boxes drawn. Exit code 0 clean, 1 problems found
(a data set that cannot be found at all raises DataError: exit 2).

Example:
    >>> import tempfile
    >>> from paligemma_xray.data.synth import generate
    >>> root = generate(tempfile.mkdtemp(), n=6, seed=0, size=96, progress=False)
    >>> report = check_dataset(root, progress=False)
    >>> report.exit_code, report.stats["train"]["images"]
    (0, 4)
"""

from __future__ import annotations

import hashlib
import html
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from paligemma_xray import atomic
from paligemma_xray.data.images import load_image
from paligemma_xray.data.layouts import open_dataset
from paligemma_xray.data.records import Dataset, Problem, Record, record_targets
from paligemma_xray.errors import DataError, ImageLoadError, check_output
from paligemma_xray.progress import bar as progress_bar

# Perceptual hash of 16x16 = 256 bits. Re-encoded, resized, brightened or slightly cropped
# (~2%) copies of one radiograph stay within 26 bits; distinct radiographs of the same kind
# (synthetic or real, bones on a dark background) measured 48 and more.
HASH_SIZE = 16
NEAR_DUPLICATE_DISTANCE = 26
# Names that augmentation tools give to the copies they make.
_AUGMENTED = re.compile(
    r"^(?P<tag>(?:h|v)?flip(?:ped)?|rot(?:ate|ated)?\d*|mirror(?:ed)?|aug(?:mented)?\d*|crop(?:ped)?"
    r"|bright(?:ness)?|contrast|noise|blur(?:red)?|shear|zoom|scale[d]?)[_\-]",
    re.IGNORECASE,
)
_ROBOFLOW_NAME = re.compile(r"\.rf\.[0-9a-f]{8,}$", re.IGNORECASE)
_TRANSFORMS: tuple[tuple[str, Any], ...] = (
    ("identical", None),
    ("flipped left-right", Image.Transpose.FLIP_LEFT_RIGHT),
    ("flipped top-bottom", Image.Transpose.FLIP_TOP_BOTTOM),
    ("rotated 90°", Image.Transpose.ROTATE_90),
    ("rotated 180°", Image.Transpose.ROTATE_180),
    ("rotated 270°", Image.Transpose.ROTATE_270),
    ("transposed", Image.Transpose.TRANSPOSE),
    ("transversed", Image.Transpose.TRANSVERSE),
)


def augmentation_tag(name: str) -> str | None:
    """The augmented-copy marker of an image name (``"flip_"`` for ``flip_0042.jpg``), or None."""
    match = _AUGMENTED.match(Path(name).name)
    return match.group(0) if match else None


def source_key(name: str) -> str:
    """The original image a file name derives from: augmentation prefixes and
    Roboflow's ``.rf.<hash>`` removed (``flip_a_jpg.rf.12ab….jpg`` → ``a_jpg``)."""
    stem = Path(name).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = _ROBOFLOW_NAME.sub("", stem)
    while (match := _AUGMENTED.match(stem)) is not None:
        stem = stem[match.end() :]
    return stem.lower()


@dataclass
class _ImageInfo:
    record: Record
    size: tuple[int, int] | None = None
    sha256: str = ""
    hashes: np.ndarray | None = None  # (8, 32) uint8: packed perceptual hash per _TRANSFORMS entry
    error: str | None = None


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; ``summary()``, ``to_json()``, ``to_html()``."""

    dataset: Dataset
    stats: dict[str, dict[str, Any]]
    problems: list[Problem]
    leakage: list[dict[str, Any]]
    gallery: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when nothing is wrong, 1 when any problem (error or warning) was found."""
        return 1 if self.problems else 0

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.dataset.root),
            "layout": self.dataset.layout,
            "classes": self.dataset.classes,
            "ok": not self.problems,
            "exit_code": self.exit_code,
            "splits": self.stats,
            "problem_counts": self.problem_counts(),
            "problems": [p.to_json() for p in self.problems],
            "leakage": self.leakage,
        }

    def summary(self) -> str:
        """A readable report: one table of splits, then every problem with file and line."""
        ds = self.dataset
        lines = [f"data set {ds.root} ({ds.layout} layout), classes: {', '.join(ds.classes) or 'none'}", ""]
        header = f"{'split':<8}{'images':>8}{'boxes':>8}{'negatives':>11}{'box w px (med)':>16}"
        header += f"{'box h px (med)':>16}  classes"
        lines.append(header)
        for split, s in self.stats.items():
            w = s["box_width_px"].get("median")
            h = s["box_height_px"].get("median")
            classes = ", ".join(f"{k} {v}" for k, v in s["classes"].items()) or "-"
            lines.append(
                f"{split:<8}{s['images']:>8}{s['boxes']:>8}{s['negatives']:>11}"
                f"{'-' if w is None else f'{w:.0f}':>16}{'-' if h is None else f'{h:.0f}':>16}  {classes}"
            )
        lines.append("")
        if not self.problems:
            lines.append("no problems found")
            return "\n".join(lines)
        errors = sum(p.severity == "error" for p in self.problems)
        lines.append(
            f"{len(self.problems)} problem(s): {errors} error(s), {len(self.problems) - errors} warning(s)"
        )
        for kind, count in self.problem_counts().items():
            lines.append(f"  {kind}: {count}")
        lines.append("")
        lines.extend(str(p) for p in self.problems)
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained page (no external assets): counts, problems and the gallery."""
        return _render_html(self)


def _thumb_hashes(image: Image.Image) -> np.ndarray:
    small = image.convert("L").resize((8 * HASH_SIZE, 8 * HASH_SIZE), Image.Resampling.BILINEAR)
    hashes = []
    for _, transform in _TRANSFORMS:
        variant = small if transform is None else small.transpose(transform)
        hashes.append(np.packbits(imagehash.phash(variant, hash_size=HASH_SIZE).hash.flatten()))
    return np.stack(hashes)


def _inspect(record: Record) -> _ImageInfo:
    info = _ImageInfo(record)
    try:
        data = record.image.read_bytes()
    except OSError as error:
        info.error = f"cannot read image {record.image}: {error.strerror or error}"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        image = load_image(data, name=record.image)
    except ImageLoadError as error:
        info.error = f"image does not decode: {error}"
        return info
    info.size = image.size
    info.hashes = _thumb_hashes(image)
    return info


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "max": round(max(values), 2),
    }


def _split_stats(infos: list[_ImageInfo]) -> dict[str, Any]:
    boxes = negatives = 0
    classes: Counter[str] = Counter()
    widths: list[float] = []
    heights: list[float] = []
    areas: list[float] = []
    sizes: Counter[str] = Counter()
    undecodable = 0
    for info in infos:
        if info.size is None:
            undecodable += 1
            continue
        sizes[f"{info.size[0]}x{info.size[1]}"] += 1
        targets = record_targets(info.record, info.size)
        if len(targets) == 0:
            negatives += 1
        boxes += len(targets)
        classes.update(targets.class_name)
        w_img, h_img = info.size
        for x1, y1, x2, y2 in targets.xyxy.tolist():
            widths.append(x2 - x1)
            heights.append(y2 - y1)
            areas.append((x2 - x1) * (y2 - y1) / float(w_img * h_img))
    return {
        "images": len(infos),
        "unique_images": len({str(i.record.image) for i in infos}),
        "undecodable": undecodable,
        "boxes": boxes,
        "negatives": negatives,
        "classes": dict(classes.most_common()),
        "box_width_px": _describe(widths),
        "box_height_px": _describe(heights),
        "box_area_fraction": {k: round(v, 5) for k, v in _describe(areas).items()},
        "image_sizes": dict(sizes.most_common(10)),
    }


def _where(info: _ImageInfo) -> dict[str, Any]:
    r = info.record
    return {"image": str(r.image), "split": r.split, "source": str(r.source), "line": r.line}


def _leakage(infos: list[_ImageInfo]) -> tuple[list[Problem], list[dict[str, Any]]]:
    """Pairs of images in different splits that are the same radiograph."""
    by_image: dict[str, _ImageInfo] = {}
    listings: dict[str, list[_ImageInfo]] = {}
    for info in infos:
        by_image.setdefault(str(info.record.image), info)
        listings.setdefault(str(info.record.image), []).append(info)
    unique = list(by_image.values())
    problems: list[Problem] = []
    pairs: list[dict[str, Any]] = []
    reported: set[tuple[int, int]] = set()

    def report(i: int, j: int, kind: str, how: str, distance: int | None) -> None:
        describe(unique[i], unique[j], kind, how, distance)
        reported.add((min(i, j), max(i, j)))

    def describe(a: _ImageInfo, b: _ImageInfo, kind: str, how: str, distance: int | None) -> None:
        # Point at the record in the later split (the evaluation side of the leak).
        order = ("train", "valid", "test")
        rank = lambda x: order.index(x.record.split) if x.record.split in order else 3  # noqa: E731
        first, second = (a, b) if rank(a) <= rank(b) else (b, a)
        tags = [
            t
            for t in (augmentation_tag(first.record.image.name), augmentation_tag(second.record.image.name))
            if t
        ]
        same_split = first.record.split == second.record.split
        what = "duplicate within split" if same_split else "leakage across splits"
        message = (
            f"{what}: {second.record.split} image {second.record.image.name!r} is {how} "
            f"{first.record.split} image {first.record.image.name!r} ({first.record.where})"
        )
        if tags:
            message += f"; augmented-copy name ({', '.join(repr(t) for t in tags)})"
        problems.append(
            Problem(
                kind=kind,
                message=message,
                path=second.record.source,
                line=second.record.line,
                severity="warning",
            )
        )
        pairs.append(
            {
                "kind": kind,
                "how": how,
                "distance": distance,
                "augmented_name": bool(tags),
                "a": _where(first),
                "b": _where(second),
            }
        )

    # The same file listed in two splits: the plainest leak (one finding per other split).
    for listed in listings.values():
        first_of_split: dict[str, _ImageInfo] = {}
        for info in listed:
            first_of_split.setdefault(info.record.split, info)
        per_split = list(first_of_split.values())
        for later in per_split[1:]:
            describe(per_split[0], later, "leakage", "the same file as", 0)

    # Identical bytes.
    groups: dict[str, list[int]] = {}
    for k, info in enumerate(unique):
        if info.sha256:
            groups.setdefault(info.sha256, []).append(k)
    for members in groups.values():
        for k in members[1:]:
            kind = (
                "duplicate_image" if unique[k].record.split == unique[members[0]].record.split else "leakage"
            )
            report(members[0], k, kind, "a byte-identical copy of", 0)
        # Copies of one file are one finding, not one per pair.
        reported.update((min(i, j), max(i, j)) for i in members for j in members if i != j)

    # Perceptual near-duplicates across splits, under the eight flips/rotations.
    with_hashes = [(k, info.hashes) for k, info in enumerate(unique) if info.hashes is not None]
    hashed = [k for k, _ in with_hashes]
    if len(hashed) > 1:
        table = np.stack([hashes for _, hashes in with_hashes])  # (n, 8, 32) packed bits
        splits = np.array([unique[k].record.split for k in hashed])
        base = table[:, 0]
        for row in range(len(hashed) - 1):
            other = slice(row + 1, None)
            xor = table[other] ^ base[row][None, None, :]
            dist = np.bitwise_count(xor).sum(axis=2, dtype=np.int64)  # (m, 8): distance to each variant
            best = dist.min(axis=1)
            for offset in np.flatnonzero((best <= NEAR_DUPLICATE_DISTANCE) & (splits[other] != splits[row])):
                i, j = hashed[row], hashed[row + 1 + int(offset)]
                if (min(i, j), max(i, j)) in reported:
                    continue
                variant = int(np.argmin(dist[offset]))
                how = _TRANSFORMS[variant][0]
                text = "a near-duplicate of" if variant == 0 else f"a near-duplicate ({how}) of"
                report(i, j, "leakage", f"{text}", int(best[offset]))

    # Same source image by name (augmented copies) in different splits.
    keys: dict[str, list[int]] = {}
    for k, info in enumerate(unique):
        keys.setdefault(source_key(info.record.image.name), []).append(k)
    for members in keys.values():
        for a_idx, i in enumerate(members):
            for j in members[a_idx + 1 :]:
                if unique[i].record.split == unique[j].record.split or (min(i, j), max(i, j)) in reported:
                    continue
                report(i, j, "leakage_by_name", "named as a copy of the same source image as", None)
    return problems, pairs


def _gallery(infos: list[_ImageInfo], n: int) -> list[dict[str, Any]]:
    """``n`` examples spread over the splits, with their boxes drawn, as JPEG data URIs."""
    from paligemma_xray.draw import annotate, fit, jpeg_data_uri

    usable = [i for i in infos if i.size is not None]
    if n <= 0 or not usable:
        return []
    picks = [usable[int(k)] for k in np.unique(np.linspace(0, len(usable) - 1, min(n, len(usable))).round())]
    items = []
    for info in picks:
        image, _ = fit(load_image(info.record.image), 512)
        targets = record_targets(info.record, image.size)
        items.append(
            {
                "data_uri": jpeg_data_uri(annotate(image, targets)),
                "image": info.record.image.name,
                "split": info.record.split,
                "where": info.record.where,
                "boxes": len(targets),
                "suffix": info.record.suffix,
            }
        )
    return items


def check_dataset(
    root: str | Path,
    *,
    json_path: str | Path | None = None,
    html_path: str | Path | None = None,
    gallery: int = 16,
    progress: bool = True,
    allow_outside_images: bool = False,
) -> CheckReport:
    """Check the data set at ``root``; write ``json_path``/``html_path`` when given.

    ``allow_outside_images``: see :func:`~paligemma_xray.data.open_dataset` (by default an
    image outside the set's folder is an ``outside_image`` error, never read or shown).

    Raises:
        DataError: when no data set is found at ``root`` (the CLI exits with 2).
    """
    for output in (json_path, html_path):
        if output is not None:
            check_output(output, folder=False)
    dataset = open_dataset(root, allow_outside_images=allow_outside_images)
    records = [r for split in dataset.splits.values() for r in split]
    if not records and not dataset.problems:
        raise DataError("the data set has no records", path=dataset.root)
    cache: dict[str, _ImageInfo] = {}
    infos: list[_ImageInfo] = []
    problems = list(dataset.problems)
    for record in progress_bar(records, desc="check", unit="img", enabled=progress):
        key = str(record.image)
        if key not in cache:
            cache[key] = _inspect(record)
        base = cache[key]
        info = _ImageInfo(record, base.size, base.sha256, base.hashes, base.error)
        if info.error:
            problems.append(Problem("undecodable_image", info.error, record.source, record.line, "error"))
        infos.append(info)
    stats = {split: _split_stats([i for i in infos if i.record.split == split]) for split in dataset.splits}
    leak_problems, leakage = _leakage(infos)
    problems.extend(leak_problems)
    problems.sort(key=lambda p: (str(p.path or ""), p.line or 0))
    report = CheckReport(dataset=dataset, stats=stats, problems=problems, leakage=leakage)
    if json_path is not None:
        atomic.write_json(json_path, report.to_json())
    if html_path is not None:
        report.gallery = _gallery(infos, gallery)
        atomic.write_text(html_path, report.to_html())
    return report


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#eee}td.l{text-align:left}.error{color:#b00020}.warning{color:#8a6d00}
.grid{display:flex;flex-wrap:wrap;gap:1rem}
.card{background:#fff;border:1px solid #ddd;padding:.5rem;max-width:340px}
.card img{max-width:320px;display:block}.card code{font-size:.75rem;word-break:break-all}
"""


def _render_html(report: CheckReport) -> str:
    e = html.escape
    ds = report.dataset
    rows = []
    for split, s in report.stats.items():
        w, h = s["box_width_px"].get("median"), s["box_height_px"].get("median")
        rows.append(
            f"<tr><td class=l>{e(split)}</td><td>{s['images']}</td><td>{s['boxes']}</td>"
            f"<td>{s['negatives']}</td>"
            f"<td>{'-' if w is None else f'{w:.0f}'}</td><td>{'-' if h is None else f'{h:.0f}'}</td>"
            f"<td class=l>{e(', '.join(f'{k}: {v}' for k, v in s['classes'].items()) or '-')}</td></tr>"
        )
    problems = "".join(
        f"<tr class={e(p.severity)}><td class=l>{e(p.severity)}</td><td class=l>{e(p.kind)}</td>"
        f"<td class=l>{e(str(p.path or ''))}</td><td>{p.line or ''}</td><td class=l>{e(p.message)}</td></tr>"
        for p in report.problems
    )
    cards = "".join(
        f'<div class=card><img src="{g["data_uri"]}" alt="{e(g["image"])}">'
        f"<div>{e(g['split'])} · {e(g['image'])} · {g['boxes']} box(es)</div>"
        f"<div><small>{e(g['where'])}</small></div><code>{e(g['suffix']) or '(negative)'}</code></div>"
        for g in report.gallery
    )
    verdict = "no problems found" if not report.problems else f"{len(report.problems)} problem(s) found"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>data check: {e(ds.root.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Data check: {e(str(ds.root))}</h1><p>{e(ds.layout)} layout · classes: "
        f"{e(', '.join(ds.classes) or 'none')} · <b>{e(verdict)}</b></p>"
        "<h2>Splits</h2><table><tr><th>split</th><th>images</th><th>boxes</th><th>negatives</th>"
        f"<th>median box w px</th><th>median box h px</th><th>classes</th></tr>{''.join(rows)}</table>"
        + (
            f"<h2>Problems</h2><table><tr><th>severity</th><th>kind</th><th>file</th><th>line</th>"
            f"<th>message</th></tr>{problems}</table>"
            if report.problems
            else ""
        )
        + (f"<h2>Training examples</h2><div class=grid>{cards}</div>" if cards else "")
        + "</body></html>\n"
    )
