"""``paligemma-xray predict PATH…``: detect (or answer a prompt) on images, folders, DICOM."""

from __future__ import annotations

from typing import Any

from paligemma_xray.cli.parser import say, verb
from paligemma_xray.infer.settings import PredictSettings

EXAMPLES = [
    "paligemma-xray predict --model runs/r1 xrays/ --out preds",
    "paligemma-xray predict --model runs/r1 xrays/ --out preds --resume",
    "paligemma-xray predict --config predict.yaml xrays/   # settings from YAML, flags override",
]


def predict(settings: PredictSettings) -> int:
    from paligemma_xray.infer.predict import check_inputs, predict

    check_inputs(settings)  # a typo must not cost the model's loading time
    detector = settings.load_detector()

    def answer(name: str, text: str) -> None:
        print(f"{name}\t{text.strip()}", flush=True)

    summary = predict(detector, settings, on_answer=None if settings.detecting else answer, log=say)
    if "images" in summary:
        notes = "".join(
            f", {summary[key]} {what}"
            for key, what in (
                ("already_done", "done before (--resume)"),
                ("duplicates", "given twice, predicted once"),
            )
            if summary.get(key)
        )
        say(
            f"predicted {summary['predicted']} image(s) into {summary['out']} "
            f"({summary['images']} with detections files, {summary['boxes']} boxes{notes})"
        )
    if "dicom_sr" in summary:
        say(
            f"wrote DICOM for {summary['dicom_sr']} DICOM image(s)"
            + (f" ({summary['dicom_seg']} SEG)" if summary.get("dicom_seg") else "")
            + f"; {summary['not_dicom']} input(s) were not DICOM and got none"
        )
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "predict",
        predict,
        help="detect fractures (or answer a prompt) on images, folders and DICOM files",
        description="Run MODEL on every image under PATH… (files, folders walked recursively, DICOM).\n"
        "Writes OUT/json/<name>.json per image (boxes, scores, text, token log-probs),\n"
        "OUT/annotated/<name>.png, and OUT/predictions.coco.json (COCO results) with\n"
        "OUT/images.json; <name> is the input's path relative to the folder holding\n"
        "all inputs. OUT/manifest.json records the model (and its checksum), prompt and\n"
        "decoding flags. Streams folders of any size; --resume skips images done.\n"
        "Free-form prompts ('caption en', 'answer en …') print NAME<TAB>ANSWER lines.\n"
        "Several GPUs: torchrun --nproc_per_node N -m paligemma_xray.cli predict …",
        examples=EXAMPLES,
        settings=PredictSettings,
    )
