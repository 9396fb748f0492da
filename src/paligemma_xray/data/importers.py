"""Convert COCO, YOLO and Pascal VOC detection sets into the Roboflow "paligemma" layout.

The source is read with supervision's own readers (``DetectionDataset.from_coco``,
``from_yolo``, ``from_pascal_voc``); boxes are written with
:func:`paligemma_xray.locations.encode`, so they survive within one location bin.
The result is ``OUT/dataset/_annotations.<split>.jsonl`` plus the images, with the prefix
``detect a ; b`` listing every class that has at least one box.

Source layouts understood (split folders named train/valid/val/test):

* COCO: ``SRC/<split>/_annotations.coco.json`` (Roboflow) or any single ``*.json`` per
  split folder; ``SRC/_annotations.coco.json``; or a ``.json`` file (images beside it).
* YOLO: ``SRC/data.yaml`` with ``SRC/<split>/{images,labels}`` (Roboflow),
  ``SRC/{images,labels}/<split>`` (Ultralytics) or ``SRC/{images,labels}``.
* Pascal VOC: ``SRC/<split>/`` with images and ``.xml`` beside (Roboflow),
  ``SRC/{JPEGImages,Annotations}``, or images and ``.xml`` files in ``SRC``.

A set without split folders becomes the ``train`` split.

Example:
    >>> import tempfile, pathlib, numpy as np, supervision as sv
    >>> from PIL import Image
    >>> src = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (100, 80)).save(src / "a.jpg")
    >>> boxes = sv.Detections(xyxy=np.array([[10., 8., 50., 40.]]), class_id=np.array([0]))
    >>> ds = sv.DetectionDataset(["fracture"], [str(src / "a.jpg")], {str(src / "a.jpg"): boxes})
    >>> _ = ds.as_coco(annotations_path=str(src / "_annotations.coco.json"))
    >>> result = import_dataset("coco", src, tempfile.mkdtemp(), progress=False)
    >>> result.classes, result.counts["train"]["boxes"]
    (['fracture'], 1)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from paligemma_xray import atomic
from paligemma_xray.data.records import SPLITS, normalise_split
from paligemma_xray.errors import DataError, check_output
from paligemma_xray.locations import SEG_TOKENS_PER_OBJECT, encode
from paligemma_xray.progress import bar as progress_bar

if TYPE_CHECKING:
    from supervision import DetectionDataset

FORMATS = ("coco", "yolo", "voc")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _sv():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # supervision warns once that OpenCV is absent
        import supervision as sv
    return sv


@dataclass
class ImportResult:
    """What :func:`import_dataset` wrote."""

    out: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    dropped_classes: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    """Each box the import changed or left out, as ``file:line: what`` (clipped to the image,
    or dropped for having no area)."""

    def summary(self) -> str:
        lines = [f"wrote {self.out / 'dataset'} (prefix 'detect {' ; '.join(self.classes)}')"]
        for split, c in self.counts.items():
            masks = f", {c['masks']} masks" if c.get("masks") else ""
            lines.append(
                f"  {split}: {c['images']} images, {c['boxes']} boxes{masks}, {c['negatives']} negatives"
            )
        if self.dropped_classes:
            lines.append(
                f"  classes without any box left out of the prefix: {', '.join(self.dropped_classes)}"
            )
        if self.changes:
            clipped = sum("clipped" in c for c in self.changes)
            dropped = len(self.changes) - clipped
            lines.append(f"  boxes changed: {clipped} clipped to the image, {dropped} without area left out:")
            lines += [f"    {change}" for change in self.changes]
        return "\n".join(lines)


def _split_dirs(src: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        key = normalise_split(sub.name)
        if key in SPLITS:
            found.setdefault(key, sub)
    return found


def _one_json(folder: Path) -> Path | None:
    preferred = folder / "_annotations.coco.json"
    if preferred.is_file():
        return preferred
    candidates = sorted(folder.glob("*.json"))
    return candidates[0] if len(candidates) == 1 else None


def _coco_sources(src: Path) -> dict[str, tuple]:
    sv = _sv()
    if src.is_file():
        return {"train": (sv.DetectionDataset.from_coco, str(src.parent), str(src))}
    sources = {}
    for split, folder in _split_dirs(src).items():
        annotations = _one_json(folder)
        if annotations is not None:
            sources[split] = (sv.DetectionDataset.from_coco, str(folder), str(annotations))
    if not sources and (annotations := _one_json(src)) is not None:
        sources["train"] = (sv.DetectionDataset.from_coco, str(src), str(annotations))
    return sources


def _yolo_sources(src: Path) -> dict[str, tuple]:
    sv = _sv()
    yaml_path = next(
        (src / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (src / n).is_file()), None
    )
    if yaml_path is None:
        raise DataError("no data.yaml (class names) in the YOLO data set", path=src)
    read = sv.DetectionDataset.from_yolo
    sources = {}
    for split, folder in _split_dirs(src).items():
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            sources[split] = (read, str(folder / "images"), str(folder / "labels"), str(yaml_path))
    if not sources and (src / "images").is_dir() and (src / "labels").is_dir():
        for split, folder in _split_dirs(src / "images").items():
            labels = src / "labels" / folder.name
            if labels.is_dir():
                sources[split] = (read, str(folder), str(labels), str(yaml_path))
        if not sources:
            sources["train"] = (read, str(src / "images"), str(src / "labels"), str(yaml_path))
    return sources


def _voc_sources(src: Path) -> dict[str, tuple]:
    read = _sv().DetectionDataset.from_pascal_voc
    sources = {}
    for split, folder in _split_dirs(src).items():
        if any(folder.glob("*.xml")):
            sources[split] = (read, str(folder), str(folder))
        elif (folder / "images").is_dir() and (folder / "annotations").is_dir():
            sources[split] = (read, str(folder / "images"), str(folder / "annotations"))
    if not sources:
        if (src / "JPEGImages").is_dir() and (src / "Annotations").is_dir():
            sources["train"] = (read, str(src / "JPEGImages"), str(src / "Annotations"))
        elif any(src.glob("*.xml")):
            sources["train"] = (read, str(src), str(src))
    return sources


def _load(fmt: str, src: Path, masks: bool = False) -> tuple[dict[str, DetectionDataset], dict[str, tuple]]:
    finder = {"coco": _coco_sources, "yolo": _yolo_sources, "voc": _voc_sources}[fmt]
    sources = finder(src)
    if not sources:
        raise DataError(
            f"no {fmt.upper()} data set found (see `paligemma-xray data import --help`)", path=src
        )
    for _, *args in sources.values():
        if fmt == "coco":
            _check_coco(*args)
        elif fmt == "yolo":
            _check_yolo(*args)
        else:
            _check_voc(*args)
    datasets: dict[str, DetectionDataset] = {}
    for split, (read, *args) in sources.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets[split] = read(*args, force_masks=True) if masks else read(*args)
        except Exception as error:
            raise DataError(f"cannot read the {fmt.upper()} {split} split: {error}", path=args[1]) from None
    return datasets, {split: tuple(args) for split, (_, *args) in sources.items()}


def _images_by_stem(folder: Path) -> set[str]:
    return (
        {p.stem for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
        if folder.is_dir()
        else set()
    )


def _check_coco(images_dir: str, annotations: str) -> None:
    """Every annotation's category is declared (supervision's own message names neither)."""
    path = Path(annotations)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # supervision's reader says what is wrong with the file
    if not isinstance(data, dict):
        return
    declared = {c.get("id") for c in data.get("categories") or [] if isinstance(c, dict)}
    for annotation in data.get("annotations") or []:
        if isinstance(annotation, dict) and annotation.get("category_id") not in declared:
            raise DataError(
                f"annotation id {annotation.get('id')} (image id {annotation.get('image_id')}) has "
                f"category_id {annotation.get('category_id')}, which no category declares "
                f"(declared: {', '.join(str(i) for i in sorted(declared, key=str)) or 'none'})",
                path=path,
            )


def _check_yolo(images_dir: str, labels_dir: str, yaml_path: str) -> None:
    """A label file without its image is refused (as COCO refuses a missing image)."""
    stems = _images_by_stem(Path(images_dir))
    for label in sorted(Path(labels_dir).glob("*.txt")):
        if label.stem not in stems and label.name != "classes.txt":  # darknet's class list
            raise DataError(f"label file has no image {label.stem}.* in {images_dir}", path=label)


def _check_voc(images_dir: str, annotations_dir: str) -> None:
    """An annotation file without its image is refused (as COCO refuses a missing image)."""
    stems = _images_by_stem(Path(images_dir))
    for xml in sorted(Path(annotations_dir).glob("*.xml")):
        if xml.stem not in stems:
            raise DataError(f"annotation has no image {xml.stem}.* in {images_dir}", path=xml)


def _box_origins(fmt: str, source: tuple, image: str) -> list[str]:
    """``file:line`` of each box of ``image``, in the order the reader returns them."""
    stem = Path(image).stem
    if fmt == "yolo":
        label = Path(source[1]) / f"{stem}.txt"
        with contextlib.suppress(OSError):
            lines = label.read_text(encoding="utf-8").splitlines()
            return [f"{label}:{n}" for n, text in enumerate(lines, 1) if text.strip()]
    if fmt == "voc":
        xml = Path(source[1]) / f"{stem}.xml"
        with contextlib.suppress(OSError):
            lines = xml.read_text(encoding="utf-8").splitlines()
            return [f"{xml}:{n}" for n, text in enumerate(lines, 1) for _ in range(text.count("<object"))]
    return []


def _fit_boxes(
    xyxy: np.ndarray, size: tuple[int, int], origins: list[str], image: str
) -> tuple[np.ndarray, list[int], list[str]]:
    """Boxes clipped to the image, those without area left out; ``(boxes, kept, changes)``."""
    width, height = size
    clipped = xyxy.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    kept: list[int] = []
    changes: list[str] = []
    for k, (before, after) in enumerate(zip(xyxy, clipped, strict=True)):
        where = origins[k] if k < len(origins) else f"{image} box {k + 1}"
        box = ", ".join(f"{v:g}" for v in before.tolist())
        if after[2] <= after[0] or after[3] <= after[1]:
            changes.append(f"{where}: box ({box}) has no area inside the {width}x{height} image: left out")
            continue
        if not np.array_equal(before, after):
            changes.append(f"{where}: box ({box}) clipped to the {width}x{height} image")
        kept.append(k)
    return clipped[kept], kept, changes


def _clean_label(name: str) -> str:
    # ";" separates objects and classes in PaliGemma text; a newline would end the suffix.
    return " ".join(str(name).replace(";", ",").split())


def import_dataset(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    mask_encoder: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImportResult:
    """Convert the ``fmt`` (``coco``/``yolo``/``voc``) data set at ``src`` into ``out``.

    ``mask_encoder`` (COCO only): maps ``(N, 64, 64)`` mask crops in [0, 1] to ``(N, 16)``
    ``<seg>`` codes (:class:`paligemma_xray.infer.masks.MaskEncoder`, the CLI's
    ``--seg-vae``). Then each object's polygon mask is cropped to its box and resized as
    big_vision does (:func:`paligemma_xray.masks.box_crop64`), encoded, and written after its
    location tokens, and the prefix is ``segment …``: a set to train segmentation on. An
    object without a polygon keeps its box only.

    An existing ``out/dataset`` is refused unless ``overwrite``, which replaces it whole:
    no split of an earlier set survives to be mixed with the new one. Written to a
    temporary folder renamed when complete.

    Raises:
        DataError: unknown format, nothing of that format at ``src``, an unreadable
            annotation file, or a missing image.
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if mask_encoder is not None and fmt != "coco":
        raise DataError(f"masks (--seg-vae) are read from COCO polygons, not from {fmt.upper()}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise DataError("no such file or folder", path=src)
    check_output(out, folder=True)
    atomic.check_fresh(out / "dataset", overwrite=overwrite, what="data set")
    datasets, sources = _load(fmt, src, masks=mask_encoder is not None)

    # Class names by box count over all splits; classes never used (e.g. the supercategory
    # Roboflow's COCO exports list first) stay out of the prompt.
    used: dict[str, int] = {}
    declared: list[str] = []
    for ds in datasets.values():
        for name in ds.classes:
            if _clean_label(name) not in declared:
                declared.append(_clean_label(name))
        for detections in ds.annotations.values():
            if detections.class_id is not None:
                for cid in detections.class_id.tolist():
                    key = _clean_label(ds.classes[int(cid)])
                    used[key] = used.get(key, 0) + 1
    classes = [c for c in declared if used.get(c)] or declared
    dropped = [c for c in declared if c not in classes]
    prefix = ("segment " if mask_encoder is not None else "detect ") + " ; ".join(classes)

    # Every image is checked before anything is written: a bad one leaves no half-made output.
    sizes: dict[str, tuple[int, int]] = {}
    for ds in datasets.values():
        for path_str in ds.image_paths:
            path = Path(path_str)
            if not path.is_file():
                raise DataError("image listed in the annotations is missing", path=path)
            try:
                with Image.open(path) as image:
                    sizes[path_str] = image.size
                    image.load()  # decodes it all: truncated and corrupt files fail here
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise DataError(f"cannot read image: {error}", path=path) from None

    changes: list[str] = []
    with atomic.staged_dir(out / "dataset") as folder:
        counts = _write_set(datasets, sources, folder, fmt, prefix, sizes, progress, changes, mask_encoder)
    return ImportResult(out=out, classes=classes, counts=counts, dropped_classes=dropped, changes=changes)


def _seg_codes(
    masks: np.ndarray | None,
    xyxy: np.ndarray,
    mask_encoder: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray | None:
    """``(N, 16)`` codes of the objects' masks (-1 rows where an object has none)."""
    if mask_encoder is None or masks is None or not len(xyxy):
        return None
    from paligemma_xray.masks import box_crop64

    codes = np.full((len(xyxy), SEG_TOKENS_PER_OBJECT), -1, dtype=np.int64)
    present = [i for i in range(len(xyxy)) if np.asarray(masks[i]).any()]
    if present:
        crops = np.stack([box_crop64(np.asarray(masks[i], bool), xyxy[i]) for i in present])
        codes[present] = np.asarray(mask_encoder(crops), dtype=np.int64).reshape(len(present), -1)
    return codes


def _write_set(
    datasets: dict[str, DetectionDataset],
    sources: dict[str, tuple],
    folder: Path,
    fmt: str,
    prefix: str,
    sizes: dict[str, tuple[int, int]],
    progress: bool,
    changes: list[str],
    mask_encoder: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, dict[str, int]]:
    names: dict[str, int] = {}
    for ds in datasets.values():
        for image_path in ds.image_paths:
            names[Path(image_path).name] = names.get(Path(image_path).name, 0) + 1
    counts: dict[str, dict[str, int]] = {}
    total = sum(len(ds.image_paths) for ds in datasets.values())
    bar = progress_bar(total=total, desc=f"import {fmt}", unit="img", enabled=progress)
    for split in sorted(datasets, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        ds = datasets[split]
        rows: list[str] = []
        c = {"images": 0, "boxes": 0, "negatives": 0, "masks": 0}
        for path_str in sorted(ds.image_paths):
            path = Path(path_str)
            size = sizes[path_str]
            # The same file name twice would overwrite: prefix the split there, then number.
            name = path.name if names[path.name] == 1 else f"{split}_{path.name}"
            number = 1
            while (folder / name).exists():
                number += 1
                name = f"{split}_{path.stem}_{number}{path.suffix}"
            shutil.copyfile(path, folder / name)
            detections = ds.annotations[path_str]
            xyxy = np.asarray(detections.xyxy, dtype=np.float64).reshape(-1, 4)
            ids = detections.class_id if detections.class_id is not None else np.zeros(len(xyxy), int)
            origins = _box_origins(fmt, sources[split], path_str)
            xyxy, kept, changed = _fit_boxes(xyxy, size, origins, path_str)
            changes += changed
            labels = [_clean_label(ds.classes[int(ids[k])]) for k in kept]
            masks = getattr(detections, "mask", None)
            codes = _seg_codes(None if masks is None else masks[kept], xyxy, mask_encoder)
            suffix = encode(xyxy, labels, size, seg_codes=codes) if len(xyxy) else ""
            c["masks"] += 0 if codes is None else int((codes >= 0).all(axis=1).sum())
            rows.append(json.dumps({"image": name, "prefix": prefix, "suffix": suffix}))
            c["images"] += 1
            c["boxes"] += len(xyxy)
            c["negatives"] += int(len(xyxy) == 0)
            bar.update(1)
        (folder / f"_annotations.{split}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        counts[split] = c
    bar.close()
    return counts
