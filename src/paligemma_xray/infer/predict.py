"""``predict``: run a Detector over images, folders and DICOM files of any number.

Streams: paths are walked lazily (one folder listing at a time, sorted so every run and
every rank sees the same order) and decoded one batch at a time, so memory does not grow
with the number of images. For each image it writes, under ``out_dir``:

* ``json/<name>.json`` — the detections (or the answer to a free-form prompt), the
  decoded text and its per-token log-probabilities;
* ``annotated/<name>.png`` — the image with its boxes (supervision's annotators), for
  detection prompts.

The per-image JSON is written last and atomically, so it marks the image as done:
``resume=True`` skips those images. At the end, ``predictions.coco.json`` (COCO results:
``image_id``, ``category_id``, ``bbox`` x y w h, ``score``) and ``images.json`` (the COCO
image list the ids refer to) are rebuilt from all per-image files, streaming them;
category ids number the prompt's classes from 1 (0: a label the prompt did not ask for).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from paligemma_xray.data.images import DICOM_SUFFIXES, is_dicom
from paligemma_xray.errors import DataError, check_output
from paligemma_xray.infer.detector import DEFAULT_DETECT_TOKENS, Detector, check_decoding, is_detection_prompt
from paligemma_xray.infer.distributed import barrier, shard, world
from paligemma_xray.locations import Detections, classes_from_prefix

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} | DICOM_SUFFIXES


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


def iter_inputs(paths: Sequence[str | Path]) -> Iterator[Item]:
    """Every image under ``paths`` (files as given, folders walked recursively, sorted)."""
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()  # walk order = name order, the same on every rank and every run
                for file in sorted(files):
                    full = Path(folder) / file
                    if full.suffix.lower() in IMAGE_SUFFIXES or _is_bare_dicom(full):
                        yield Item(full, f"{path.name}/{full.relative_to(path).as_posix()}")
        elif path.is_file():
            yield Item(path, path.name)
        else:
            raise DataError("no such image file or folder", path=path)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def annotate(image, detections: Detections):
    """The image with boxes and ``label score`` captions (supervision)."""
    import numpy as np
    import supervision as sv
    from PIL import Image

    frame = np.asarray(image.convert("RGB")).copy()
    if len(detections):
        sv_det = detections.to_supervision()
        sv_det.class_id = np.zeros(len(detections), dtype=int)  # one colour for every box
        scores = detections.score if detections.score is not None else [None] * len(detections)
        labels = [
            f"{name} {score:.2f}" if score is not None else name
            for name, score in zip(detections.class_name, scores)
        ]
        thickness = max(2, round(max(image.size) / 300))
        frame = sv.BoxAnnotator(thickness=thickness).annotate(frame, sv_det)
        frame = sv.LabelAnnotator(text_scale=max(0.4, max(image.size) / 1200)).annotate(
            frame, sv_det, labels=labels
        )
    return Image.fromarray(frame)


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
    annotated: bool = True,
    on_answer: Callable[[str, str], None] | None = None,
    progress: bool = True,
) -> dict:
    """Predict every image under ``paths`` into ``out_dir``; returns a small summary.

    ``threshold`` keeps boxes scored at least that much. ``on_answer(name, text)`` is
    called for every image (the CLI prints free-form answers with it).
    """
    from paligemma_xray.data import load_image

    check_decoding(batch_size=batch_size, max_new_tokens=max_new_tokens, threshold=threshold)
    out = check_output(out_dir, folder=True)
    if next(iter_inputs(paths), None) is None:  # a typo'd folder must not "succeed" with nothing
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no image files here (looked for {suffixes})", path=paths[0] if paths else ".")
    w = world()
    detecting = is_detection_prompt(prompt)
    mine = shard(iter_inputs(paths), w)

    def todo() -> Iterator[tuple[int, Item]]:
        for index, item in mine:
            if resume and (out / "json" / f"{item.name}.json").is_file():
                continue
            yield index, item

    # Images of the batch being decoded, kept for drawing: never more than one batch.
    pending: list[tuple[int, Item, object]] = []

    def images() -> Iterator:
        for index, item in todo():
            image = load_image(item.path)
            pending.append((index, item, image))
            yield image

    bar = tqdm(desc="predict", unit="img", disable=not progress or not w.is_main)
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
            record["detections"] = found.to_json()
            if getattr(detector, "calibration", None) is not None:  # calibrated beside the raw score
                detector.calibration.add_to_json(record["detections"], found)
            if annotated:
                png = out / "annotated" / f"{item.name}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                annotate(image, found).save(png)
        _write_atomic(out / "json" / f"{item.name}.json", json.dumps(record) + "\n")
        if on_answer is not None:
            on_answer(item.name, generation.text)
        done += 1
        bar.update(1)
    bar.close()
    barrier(w)
    summary = {"predicted": done, "out": str(out), "world_size": w.size}
    if w.is_main:
        summary.update(_write_coco(out, paths, prompt if detecting else None))
    barrier(w)
    return summary


def _write_coco(out: Path, paths: Sequence[str | Path], prompt: str | None) -> dict:
    """COCO results + image list from the per-image files, streamed (ids = input order + 1)."""
    classes = classes_from_prefix(prompt) if prompt else []
    n_images = n_boxes = 0
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "predictions.coco.json.tmp").open("w") as results,
        (out / "images.json.tmp").open("w") as images,
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
    (out / "predictions.coco.json.tmp").replace(out / "predictions.coco.json")
    (out / "images.json.tmp").replace(out / "images.json")
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    (out / "categories.json").write_text(json.dumps(categories) + "\n")
    return {"images": n_images, "boxes": n_boxes}
