"""``predict``: run a Detector over images, folders and DICOM files of any number.

Streams: paths are walked lazily (one folder listing at a time, sorted so every run and
every rank sees the same order) and decoded one batch at a time, so memory does not grow
with the number of images. For each image it writes, under ``out_dir``:

* ``json/<name>.json`` — the detections (or the answer to a free-form prompt), the
  decoded text and its per-token log-probabilities;
* ``annotated/<name>.png`` — the image with its boxes (supervision's annotators), for
  detection prompts, and the objects' masks where the answer carried ``<seg>`` codes
  (decoded with the detector's ``mask_decoder``; each detection's ``mask`` in the JSON is
  its COCO RLE over the whole image, also the ``segmentation`` of its COCO result).

Output names keep the inputs' paths relative to the folder that holds them all
(``predict a/x.jpg b/x.jpg`` writes ``json/a/x.jpg.json`` and ``json/b/x.jpg.json``), so no
two images share a file; a file given twice is predicted once. Every file is written under a
temporary name and renamed when complete (:mod:`paligemma_xray.atomic`).

The per-image JSON is written last, so it marks the image as done: ``resume=True`` skips
those images. ``manifest.json`` records what made the folder (model id and weights
checksum, prompt, decoding settings); a resume with other settings is refused, and a folder
that already holds results is only replaced with ``overwrite=True``. At the end,
``predictions.coco.json`` (COCO results: ``image_id``, ``category_id``, ``bbox`` x y w h,
``score``) and ``images.json`` (the COCO image list the ids refer to) are rebuilt from all
per-image files, streaming them; category ids number the prompt's classes from 1 (0: a
label the prompt did not ask for).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from paligemma_xray import atomic
from paligemma_xray.data.images import DICOM_SUFFIXES, is_dicom
from paligemma_xray.draw import annotate
from paligemma_xray.errors import ConfigError, DataError, check_output
from paligemma_xray.infer import dicom_sr
from paligemma_xray.infer.detector import DetectorLike, Generation
from paligemma_xray.infer.distributed import barrier, shard, world
from paligemma_xray.infer.prefetch import Background, Prefetch, default_workers
from paligemma_xray.infer.settings import PredictSettings
from paligemma_xray.locations import Detections, classes_from_prefix
from paligemma_xray.progress import bar as progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} | DICOM_SUFFIXES
MANIFEST = "manifest.json"
# What predict writes into its folder: removed by overwrite=True, nothing else is.
OUTPUTS = (
    "json",
    "annotated",
    "dicom-sr",
    "dicom-sc",
    "dicom-seg",
    "predictions.coco.json",
    "images.json",
    "categories.json",
    MANIFEST,
)
# Settings that change what is written: a resume must use the same.
SETTINGS = ("model", "prompt", "threshold", "max_new_tokens", "box_or_stop", "min_box_probability")


@dataclass(frozen=True)
class Item:
    path: Path
    name: str  # relative output name, unique within a run ("folder/sub/x.png")


def _is_bare_dicom(path: Path) -> bool:
    """A DICOM file without an extension (scanners write ``IM0001``): read its 132-byte header."""
    if path.suffix:
        return False
    try:
        with path.open("rb") as handle:
            return is_dicom(handle.read(132))
    except OSError:
        return False


def _common_base(paths: Sequence[str | Path]) -> str:
    """The folder holding every input: names are relative to it (a folder keeps its own name)."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath(parents) if parents else os.getcwd()


def iter_inputs(paths: Sequence[str | Path], counts: dict[str, int] | None = None) -> Iterator[Item]:
    """Every image under ``paths`` (files as given, folders walked recursively, sorted).

    Names are the paths relative to the folder holding all inputs, hence unique; an image
    reached twice (a file given twice, or inside a folder also given) comes once, and is
    counted in ``counts["duplicates"]``.
    """
    base = _common_base(paths)
    seen: set[str] = set()

    def item(path: Path) -> Item | None:
        name = Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
        if name in seen:
            if counts is not None:
                counts["duplicates"] = counts.get("duplicates", 0) + 1
            return None
        seen.add(name)
        return Item(path, name)

    for given in paths:
        path = Path(given)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()  # walk order = name order, the same on every rank and every run
                for file in sorted(files):
                    full = Path(folder) / file
                    if (full.suffix.lower() in IMAGE_SUFFIXES or _is_bare_dicom(full)) and (
                        found := item(full)
                    ):
                        yield found
        elif path.is_file():
            if found := item(path):
                yield found
        else:
            raise DataError("no such image file or folder", path=path)


def check_inputs(settings: PredictSettings) -> Path:
    """Every check that needs no model, so a mistake is reported before minutes of loading.

    (The values themselves were checked when ``settings`` was built.) Raises a
    :class:`~paligemma_xray.errors.PaligemmaXrayError` for an output that cannot be written
    or already holds results (without ``resume`` / ``overwrite``), and a path that is not
    there or holds no image. Returns the output folder.
    """
    out = check_output(settings.out, folder=True)
    if not settings.resume and not settings.overwrite and out.is_dir() and _holds_results(out):
        raise ConfigError(
            "the output folder is not empty; add --resume to continue the predictions in it, "
            "or --overwrite to replace them",
            path=out,
        )
    paths = settings.paths
    if next(iter_inputs(paths), None) is None:  # a typo'd folder must not "succeed" with nothing
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no image files here (looked for {suffixes})", path=paths[0] if paths else ".")
    return out


def chosen_threshold(detector: DetectorLike, settings: PredictSettings) -> tuple[float | None, str | None]:
    """The score threshold ``predict`` applies, and a note saying where it came from.

    ``settings.threshold`` when given; else, for a detection prompt, the operating point
    saved with the model (``evaluate --operating-point``, read into ``detector.calibration``);
    else None (every box kept).
    """
    saved = detector.calibration
    if settings.threshold is not None or not settings.detecting or saved is None or saved.threshold is None:
        return settings.threshold, None
    note = (
        f"threshold {saved.threshold:.3g}: the operating point saved with the model ({saved.operating_point})"
    )
    return saved.threshold, note


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything but what a predict that failed before its first result
    leaves (its manifest, empty output folders, temporaries): that is not worth a refusal."""
    for entry in out.iterdir():
        if entry.name == MANIFEST or (entry.name.startswith(".") and ".tmp-" in entry.name):
            continue
        if entry.name in OUTPUTS and entry.is_dir() and not any(p.is_file() for p in entry.rglob("*")):
            continue
        return True
    return False


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"unreadable manifest ({error}); use --overwrite to start again", path=path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise DataError("not a predict manifest; use --overwrite to start again", path=path)
    return manifest


def _check_resume(
    out: Path, previous: dict | None, settings: dict, checksum: dict | None, dtype: str | None = None
) -> None:
    """Refuse to continue results made with other settings (they would be mixed, silently)."""
    if previous is None:
        if (out / "json").is_dir():
            raise ConfigError(
                f"no {MANIFEST} here, so nothing says which model and prompt made these "
                "results; use --overwrite to start again",
                path=out,
            )
        return
    old = previous["settings"]
    differ = [
        f"{key} {old.get(key)!r} then, {settings[key]!r} now"
        for key in SETTINGS
        if key != "model" and old.get(key) != settings[key]
    ]
    if previous.get("dtype") and dtype and previous["dtype"] != dtype:  # answers differ a little
        differ.append(f"dtype {previous['dtype']!r} then, {dtype!r} now")
    old_sum = (previous.get("model_checksum") or {}).get("sha256")
    new_sum = (checksum or {}).get("sha256")
    if old_sum and new_sum:
        if old_sum != new_sum:
            differ.insert(0, f"model weights {old_sum[:12]} then, {new_sum[:12]} now ({settings['model']})")
    elif old.get("model") != settings["model"]:
        differ.insert(0, f"model {old.get('model')!r} then, {settings['model']!r} now")
    if differ:
        raise ConfigError(
            f"--resume with other settings than the results here: {'; '.join(differ)}. "
            "Use the same settings, another --out, or --overwrite to start again",
            path=out / MANIFEST,
        )


class _DicomOutputs:
    """The DICOM SR / Secondary Capture / SEG of each DICOM input (``--dicom-sr``); others are counted."""

    def __init__(
        self,
        detector: DetectorLike,
        out: Path,
        prompt: str,
        threshold: float | None,
        sr: bool,
        sc: bool,
        seg: bool = False,
    ) -> None:
        self.detector, self.out, self.sr, self.sc, self.seg = detector, out, sr, sc, seg
        self.settings = dicom_sr.settings_key(prompt, threshold)
        self.algorithm: dicom_sr.Algorithm | None = None
        self.counts = {"dicom_sr": 0, "not_dicom": 0, "dicom_seg": 0}

    def write(self, item: Item, image: Image.Image, found: Detections) -> None:
        if not (self.sr or self.sc or self.seg):
            return
        if not dicom_sr.is_dicom_file(item.path):
            self.counts["not_dicom"] += 1
            return
        if self.algorithm is None:
            self.algorithm = dicom_sr.algorithm_of(self.detector)
        dicom_sr.write_for_image(
            self.out,
            item.name,
            item.path,
            image,
            found,
            self.algorithm,
            calibration=self.detector.calibration,
            settings=self.settings,
            sr=self.sr,
            secondary_capture=self.sc,
        )
        self.counts["dicom_sr"] += 1
        if self.seg:
            from paligemma_xray.infer.dicom_seg import write_seg

            written = write_seg(self.out, item.name, item.path, found, self.algorithm, settings=self.settings)
            self.counts["dicom_seg"] += written is not None


def predict(
    detector: DetectorLike,
    settings: PredictSettings,
    *,
    on_answer: Callable[[str, str], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Predict every image under ``settings.paths`` into ``settings.out``; returns a small summary.

    ``settings.threshold`` keeps boxes scored at least that much (default:
    :func:`chosen_threshold`, the operating point saved with the model; ``log`` hears where
    it came from). ``on_answer(name, text)`` is called for every image (the CLI prints
    free-form answers with it). ``resume`` continues a folder made with the same settings;
    ``overwrite`` replaces its results. ``dicom_sr`` / ``secondary_capture``: for each DICOM
    input also write ``dicom-sr/<name>.sr.dcm`` (a TID 1500 Structured Report) /
    ``dicom-sc/<name>.sc.dcm`` (boxes drawn); see :mod:`.dicom_sr`. ``dicom_seg``: also
    ``dicom-seg/<name>.seg.dcm``, a DICOM SEG of the objects' masks (:mod:`.dicom_seg`; needs
    the detector's ``mask_decoder``; an image whose objects have no mask gets none). ``workers``: threads
    that decode the next images while the model works on this batch, and as many that
    write the annotated PNGs and JSON files of the previous ones (default: up to 4; 0 does
    both on this thread). The summary's ``input_wait_s`` / ``output_wait_s`` are the times
    the model waited for decoded images / for files to be written.
    """
    from paligemma_xray.data import load_image
    from paligemma_xray.model.fingerprint import fingerprint

    out = check_inputs(settings)
    threshold, note = chosen_threshold(detector, settings)
    if note is not None and log is not None:
        log(note)
    paths, prompt, max_new_tokens = settings.paths, settings.prompt, settings.max_new_tokens
    batch_size, resume, overwrite = settings.batch_size, settings.resume, settings.overwrite
    dicom_sr, secondary_capture, annotated = settings.dicom_sr, settings.secondary_capture, settings.images
    workers = settings.workers
    w = world()
    detecting = settings.detecting
    if settings.dicom_seg and detector.mask_decoder is None:
        raise ConfigError("--dicom-seg writes masks: give the mask decoder with --seg-vae vae-oid.npz")
    dicom_outputs = _DicomOutputs(
        detector, out, prompt, threshold, dicom_sr, secondary_capture, settings.dicom_seg
    )
    recorded = {
        "model": detector.model_id,
        "prompt": prompt,
        "threshold": threshold,
        "max_new_tokens": max_new_tokens,
        "box_or_stop": detector.box_or_stop,
        "min_box_probability": detector.min_box_probability,
    }
    previous = _read_manifest(out) if resume else None
    checksum = fingerprint(detector.model_id, previous=(previous or {}).get("model_checksum"))
    if resume:
        _check_resume(out, previous, recorded, checksum, detector.dtype)
    barrier(w)  # every rank has checked the folder before the first one writes into it
    if w.is_main:
        if resume:  # what a killed run was writing: never renamed onto a final name, removed
            for name in OUTPUTS:
                if (out / name).is_dir():
                    for folder in [out / name, *(p for p in (out / name).rglob("*") if p.is_dir())]:
                        atomic.remove_stale_temporaries(folder)
        if overwrite:
            for name in OUTPUTS:
                target = out / name
                with atomic.disk_errors(target):
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
        manifest = {"settings": recorded, "model_checksum": checksum, "dtype": detector.dtype}
        atomic.write_json(out / MANIFEST, manifest)
    barrier(w)
    counts: dict[str, int] = {}
    mine = shard(iter_inputs(paths, counts), w)

    def todo() -> Iterator[tuple[int, Item]]:
        for index, item in mine:
            if resume and (out / "json" / f"{item.name}.json").is_file():
                counts["already_done"] = counts.get("already_done", 0) + 1
                continue
            yield index, item

    # Images of the batch being decoded, kept for drawing: never more than one batch
    # (plus the next batch, decoding in the loader's threads).
    pending: list[tuple[int, Item, Image.Image]] = []
    workers = default_workers() if workers is None else workers
    size = batch_size or detector.batch_size
    # A whole next batch in flight while this one decodes.
    ahead = size + 2 * workers
    loader = Prefetch(todo(), lambda pair: load_image(pair[1].path), workers=workers, ahead=ahead)

    def images() -> Iterator:
        for (index, item), image in loader:
            pending.append((index, item, image))
            yield image

    calibration = detector.calibration

    def write_outputs(item: Item, image: Image.Image, found: Detections | None, record: dict) -> None:
        # In the writer's threads (PNG encoding outlasts decoding a batch); JSON last.
        if found is not None:
            record["detections"] = found.to_json()
            if calibration is not None:  # calibrated beside the raw score
                calibration.add_to_json(record["detections"], found)
            if annotated:
                # zlib level 1: 4.7x faster than PIL's default 6 on a 1024 px radiograph, 7% larger
                with atomic.staged_path(out / "annotated" / f"{item.name}.png") as png:
                    annotate(image, found).save(png, format="PNG", compress_level=1)
        atomic.write_text(out / "json" / f"{item.name}.json", json.dumps(record) + "\n")

    writer = Background(workers)
    bar = progress_bar(desc="predict", unit="img", enabled=progress and w.is_main)
    done = 0
    stream: Iterator[tuple[Generation, Detections | None]]
    if detecting:
        stream = detector.iter_detect(images(), prompt, max_new_tokens, batch_size, threshold)
    else:
        stream = ((g, None) for g in detector.iter_generate(images(), prompt, max_new_tokens, batch_size))
    for generation, found in stream:
        index, item, image = pending.pop(0)
        record: dict = {
            "image": str(item.path),
            "name": item.name,
            "index": index,
            "prompt": prompt,
            "text": generation.text,
            "finished": generation.finished,
            "tokens": generation.tokens,
            "logprobs": [round(v, 5) for v in generation.logprobs],
        }
        if found is not None:
            dicom_outputs.write(item, image, found)  # here: it keeps counts; before the JSON
        writer.submit(write_outputs, item, image, found, record)
        if on_answer is not None:
            on_answer(item.name, generation.text)
        done += 1
        bar.update(1)
    writer.close()  # every file written (or the first write error raised)
    bar.close()
    barrier(w)
    summary = {
        "predicted": done,
        "out": str(out),
        "world_size": w.size,
        "duplicates": counts.get("duplicates", 0),
        "already_done": counts.get("already_done", 0),
    }
    summary["input_wait_s"] = loader.wait_s  # time the model waited for decoded images
    summary["output_wait_s"] = writer.wait_s  # ... and for earlier images' files to be written
    if dicom_sr or secondary_capture or settings.dicom_seg:
        summary.update(dicom_outputs.counts)
    if w.is_main:
        summary.update(_write_coco(out, paths, prompt if detecting else None))
    barrier(w)
    return summary


def _write_coco(out: Path, paths: Sequence[str | Path], prompt: str | None) -> dict:
    """COCO results + image list from the per-image files, streamed (ids = input order + 1)."""
    classes = classes_from_prefix(prompt) if prompt else []
    n_images = n_boxes = 0
    with (
        atomic.open_for_write(out / "predictions.coco.json") as results,
        atomic.open_for_write(out / "images.json") as images,
    ):
        results.write("[")
        images.write("[")
        for index, item in enumerate(iter_inputs(paths)):
            path = out / "json" / f"{item.name}.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("detections") is None:
                continue
            detections = record["detections"]
            width, height = detections["image_size"]
            images.write(
                ("," if n_images else "")
                + json.dumps({"id": index + 1, "file_name": item.name, "width": width, "height": height})
            )
            n_images += 1
            for obj in detections["detections"]:
                x1, y1, x2, y2 = obj["box"]
                category = classes.index(obj["label"]) + 1 if obj["label"] in classes else 0
                result = {
                    "image_id": index + 1,
                    "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": obj["score"] if obj["score"] is not None else 1.0,
                }
                if obj.get("mask") is not None:  # COCO's segm results: the mask as RLE
                    result["segmentation"] = obj["mask"]
                results.write(("," if n_boxes else "") + "\n" + json.dumps(result))
                n_boxes += 1
        results.write("\n]\n")
        images.write("]\n")
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    atomic.write_text(out / "categories.json", json.dumps(categories) + "\n")
    return {"images": n_images, "boxes": n_boxes}
