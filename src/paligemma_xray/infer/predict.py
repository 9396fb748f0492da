"""``predict``: run a Detector over images, folders and DICOM files of any number.

Streams: paths are walked lazily (one folder listing at a time, sorted so every run and
every rank sees the same order) and decoded one batch at a time, so memory does not grow
with the number of images. For each image it writes, under ``out_dir``:

* ``json/<name>.json`` — the detections (or the answer to a free-form prompt), the
  decoded text and its per-token log-probabilities;
* ``annotated/<name>.png`` — the image with its boxes (supervision's annotators), for
  detection prompts.

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

from paligemma_xray import atomic
from paligemma_xray.data.images import DICOM_SUFFIXES, is_dicom
from paligemma_xray.draw import annotate
from paligemma_xray.errors import ConfigError, DataError, check_output
from paligemma_xray.infer.detector import DEFAULT_DETECT_TOKENS, Detector, check_decoding, is_detection_prompt
from paligemma_xray.infer.distributed import barrier, shard, world
from paligemma_xray.infer.prefetch import Background, Prefetch, default_workers
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


def check_inputs(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_DETECT_TOKENS,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Every check that needs no model, so a mistake is reported before minutes of loading.

    Raises a :class:`~paligemma_xray.errors.PaligemmaXrayError` for a bad number, an output
    that cannot be written or already holds results (without ``resume`` / ``overwrite``),
    and a path that is not there or holds no image. Returns the output folder.
    """
    check_decoding(batch_size=batch_size, max_new_tokens=max_new_tokens, threshold=threshold)
    out = check_output(out_dir, folder=True)
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the results in the folder and --overwrite replaces them: give one", path=out
        )
    if not resume and not overwrite and out.is_dir() and _holds_results(out):
        raise ConfigError(
            "the output folder is not empty; add --resume to continue the predictions in it, "
            "or --overwrite to replace them",
            path=out,
        )
    if next(iter_inputs(paths), None) is None:  # a typo'd folder must not "succeed" with nothing
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no image files here (looked for {suffixes})", path=paths[0] if paths else ".")
    return out


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


def _check_resume(out: Path, previous: dict | None, settings: dict, checksum: dict | None) -> None:
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
    """The DICOM SR / Secondary Capture of each DICOM input (``--dicom-sr``); others are counted."""

    def __init__(self, detector, out: Path, prompt: str, threshold, sr: bool, sc: bool) -> None:
        self.detector, self.out, self.sr, self.sc = detector, out, sr, sc
        from paligemma_xray.infer.dicom_sr import settings_key

        self.settings = settings_key(prompt, threshold)
        self.algorithm = None
        self.counts = {"dicom_sr": 0, "not_dicom": 0}

    def write(self, item: Item, image, found: Detections) -> None:
        if not (self.sr or self.sc):
            return
        from paligemma_xray.infer import dicom_sr

        if not dicom_sr.is_dicom_file(item.path):
            self.counts["not_dicom"] += 1
            return
        if self.algorithm is None:
            self.algorithm = dicom_sr.algorithm_of(self.detector)
        boxes, whole = dicom_sr.calibrated(self.detector, found)
        dicom_sr.write_for_image(
            self.out,
            item.name,
            item.path,
            image,
            found,
            self.algorithm,
            settings=self.settings,
            sr=self.sr,
            secondary_capture=self.sc,
            probability=boxes,
            image_probability=whole,
        )
        self.counts["dicom_sr"] += 1


def predict(
    detector: Detector,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    prompt: str = "detect fracture",
    threshold: float | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_DETECT_TOKENS,
    resume: bool = False,
    overwrite: bool = False,
    annotated: bool = True,
    on_answer: Callable[[str, str], None] | None = None,
    progress: bool = True,
    dicom_sr: bool = False,
    secondary_capture: bool = False,
    workers: int | None = None,
) -> dict:
    """Predict every image under ``paths`` into ``out_dir``; returns a small summary.

    ``threshold`` keeps boxes scored at least that much. ``on_answer(name, text)`` is
    called for every image (the CLI prints free-form answers with it). ``resume``
    continues a folder made with the same settings; ``overwrite`` replaces its results.
    ``dicom_sr`` / ``secondary_capture``: for each DICOM input also write
    ``dicom-sr/<name>.sr.dcm`` (a TID 1500 Structured Report) / ``dicom-sc/<name>.sc.dcm``
    (boxes drawn); see :mod:`.dicom_sr`.
    ``workers``: threads that decode the next images while the model works on this batch,
    and as many that write the annotated PNGs and JSON files of the previous ones (default:
    up to 4; 0 does both on this thread). The summary's ``input_wait_s`` / ``output_wait_s``
    are the times the model waited for decoded images / for files to be written.
    """
    from paligemma_xray.data import load_image
    from paligemma_xray.model.fingerprint import fingerprint

    out = check_inputs(
        paths,
        out_dir,
        threshold=threshold,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        resume=resume,
        overwrite=overwrite,
    )
    w = world()
    detecting = is_detection_prompt(prompt)
    if (dicom_sr or secondary_capture) and not detecting:
        raise ConfigError(f"--dicom-sr needs a detection prompt ('detect …'), not {prompt!r}")
    dicom_outputs = _DicomOutputs(detector, out, prompt, threshold, dicom_sr, secondary_capture)
    settings = {
        "model": detector.model_id,
        "prompt": prompt,
        "threshold": threshold,
        "max_new_tokens": max_new_tokens,
        "box_or_stop": detector.box_or_stop,
        "min_box_probability": getattr(detector, "min_box_probability", None),
    }
    previous = _read_manifest(out) if resume else None
    checksum = fingerprint(detector.model_id, previous=(previous or {}).get("model_checksum"))
    if resume:
        _check_resume(out, previous, settings, checksum)
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
        atomic.write_json(out / MANIFEST, {"settings": settings, "model_checksum": checksum})
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
    pending: list[tuple[int, Item, object]] = []
    workers = default_workers() if workers is None else workers
    size = batch_size or detector.batch_size
    # A whole next batch in flight while this one decodes.
    ahead = size + 2 * workers
    loader = Prefetch(todo(), lambda pair: load_image(pair[1].path), workers=workers, ahead=ahead)

    def images() -> Iterator:
        for (index, item), image in loader:
            pending.append((index, item, image))
            yield image

    def write_outputs(item: Item, image, found: Detections | None, record: dict) -> None:
        # In the writer's threads (PNG encoding outlasts decoding a batch); JSON last.
        if found is not None:
            record["detections"] = found.to_json()
            if getattr(detector, "calibration", None) is not None:  # calibrated beside the raw score
                detector.calibration.add_to_json(record["detections"], found)
            if annotated:
                # zlib level 1: 4.7x faster than PIL's default 6 on a 1024 px radiograph, 7% larger
                with atomic.staged_path(out / "annotated" / f"{item.name}.png") as png:
                    annotate(image, found).save(png, format="PNG", compress_level=1)
        atomic.write_text(out / "json" / f"{item.name}.json", json.dumps(record) + "\n")

    writer = Background(workers)
    bar = progress_bar(desc="predict", unit="img", enabled=progress and w.is_main)
    done = 0
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
    if dicom_sr or secondary_capture:
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
                results.write(
                    ("," if n_boxes else "")
                    + "\n"
                    + json.dumps(
                        {
                            "image_id": index + 1,
                            "category_id": category,
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": obj["score"] if obj["score"] is not None else 1.0,
                        }
                    )
                )
                n_boxes += 1
        results.write("\n]\n")
        images.write("]\n")
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    atomic.write_text(out / "categories.json", json.dumps(categories) + "\n")
    return {"images": n_images, "boxes": n_boxes}
