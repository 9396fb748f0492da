"""Command line: ``paligemma-xray VERB …``.

Thin by design: each verb parses its flags here and calls one library function. Flags are
documented where they are declared, so ``--help`` on any verb explains it. User mistakes
arrive as :class:`~paligemma_xray.errors.PaligemmaXrayError` and are printed without a
traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from paligemma_xray import __version__
from paligemma_xray.errors import PaligemmaXrayError

Handler = Callable[[argparse.Namespace], int]

# The end of each verb's --help: a command or two to start from (keyed by the verb's prog).
_EXAMPLES: dict[str, list[str]] = {
    "data synth": [
        "paligemma-xray data synth synth-data --n 200",
        "paligemma-xray data synth synth-data --n 50 --overwrite   # replace the set",
    ],
    "data check": ["paligemma-xray data check my-set --html check.html"],
    "data import": ["paligemma-xray data import --format coco coco-export/ my-set"],
    "data download": ["paligemma-xray data download --workspace W --project P --version 1"],
    "convert": [
        "paligemma-xray convert pt_224.npz hf-model/",
        "paligemma-xray convert runs/r1 r1.npz --dtype bfloat16",
    ],
    "train": [
        "paligemma-xray train --model hf-model --data my-set --out runs/r1",
        "paligemma-xray train --resume runs/r1",
    ],
    "predict": [
        "paligemma-xray predict --model runs/r1 xrays/ --out preds",
        "paligemma-xray predict --model runs/r1 xrays/ --out preds --resume",
    ],
    "evaluate": ["paligemma-xray evaluate --model runs/r1 --data my-set --out eval-r1"],
    "report": ["paligemma-xray report eval-r1 --compare eval-base"],
    "serve": ["PALIGEMMA_XRAY_API_KEY=secret paligemma-xray serve --model runs/r1 --port 8000"],
    "demo": ["paligemma-xray demo --out demo-out", "paligemma-xray demo --minutes 2 --out quick-demo"],
    "demo pretrain": ["paligemma-xray demo pretrain --out my-base"],
    "pacs": [
        "paligemma-xray pacs --url http://orthanc:8042/dicom-web --model runs/r1 --since 2026-11-01",
        "paligemma-xray pacs --url http://orthanc:8042/dicom-web --model runs/r1 --watch --interval 300",
    ],
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a pointer to ``--help``.

    argparse prints the whole usage (dozens of lines for ``train``) before the error; the
    line that says what is wrong then scrolls away.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        # Flag help taken from docstrings carries reST (``x``, :func:`y`); a terminal shows it raw.
        text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", super().format_help())
        return re.sub(r"``([^`]*)``", r"\1", text)


def _verb(subparsers, name: str, handler: Handler, help: str, description: str | None = None):
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # a verb may declare its own --no-progress (train's recipe field)
    )
    verb = parser.prog.removeprefix("paligemma-xray ")
    if verb in _EXAMPLES:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in _EXAMPLES[verb])
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (without a terminal they are plain lines every 30 s)",
    )
    parser.set_defaults(handler=handler)
    return parser


# ---------------------------------------------------------------------------------------------
# data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from paligemma_xray.data.synth import generate

    root = generate(
        args.out, n=args.n, seed=args.seed, size=args.size, image_format=args.format, overwrite=args.overwrite
    )
    print(f"wrote {args.n} synthetic radiographs to {root / 'dataset'}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from paligemma_xray.data.check import check_dataset

    report = check_dataset(
        args.dir,
        json_path=args.json,
        html_path=args.html,
        gallery=args.gallery,
        allow_outside_images=args.allow_outside_images,
    )
    print(report.summary())
    return report.exit_code


def cmd_data_import(args: argparse.Namespace) -> int:
    from paligemma_xray.data.importers import import_dataset

    print(import_dataset(args.format, args.src, args.out, overwrite=args.overwrite).summary())
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from paligemma_xray.data.download import download

    root = download(args.workspace, args.project, args.version, out=args.out, api_key_file=args.api_key_file)
    print(f"downloaded {args.workspace}/{args.project} version {args.version} to {root}")
    return 0


def _add_data(verbs) -> None:
    data = verbs.add_parser(
        "data",
        help="data sets: make a synthetic set, check, import, download",
        description="Data sets in the Roboflow 'paligemma' JSONL layout: make, check, import, download.",
    )
    sub = data.add_subparsers(title="data verbs", metavar="DATA_VERB")
    sub.required = True

    p = _verb(
        sub,
        "synth",
        cmd_data_synth,
        help="write a deterministic synthetic fracture data set (Roboflow layout)",
        description="Render X-ray-like radiographs with fracture lines and their boxes, written as\n"
        "OUT/dataset/_annotations.{train,valid,test}.jsonl plus images (70/15/15 split).\n"
        "The same --seed gives the same bytes.",
    )
    p.add_argument("out", metavar="OUT", help="output folder (created; the set lands in OUT/dataset/)")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    p.add_argument("--size", type=int, default=448, metavar="PX", help="image side in pixels (default: 448)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format (default: jpg)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT/dataset (whole: the two sets are never merged)",
    )

    p = _verb(
        sub,
        "check",
        cmd_data_check,
        help="check a data set: counts, problems with file and line, leakage, gallery",
        description="Read a data set (Roboflow export, maestro layout or plain JSONL), decode every\n"
        "image and report counts per split and every problem with its file and line,\n"
        "including duplicate and near-duplicate images across splits (leakage).\n\n"
        "Exit code: 0 clean, 1 problems found, 2 no usable data set.",
    )
    p.add_argument("dir", metavar="DIR", help="data set folder, its dataset/ folder, or a .jsonl file")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON to FILE")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with a gallery to FILE")
    p.add_argument(
        "--gallery",
        type=int,
        default=16,
        metavar="N",
        help="number of example images with boxes drawn in the HTML report (default: 16)",
    )
    _outside_flag(p)

    p = _verb(
        sub,
        "import",
        cmd_data_import,
        help="convert a COCO, YOLO or Pascal VOC detection set to the Roboflow 'paligemma' layout",
        description="Convert a detection data set into OUT/dataset/_annotations.<split>.jsonl\n"
        "+ images, "
        "prefix 'detect a ; b' listing the classes. Split folders (train/valid/test)\n"
        "are kept; a set without them becomes the train split.",
    )
    p.add_argument("--format", required=True, choices=("coco", "yolo", "voc"), help="format of SRC")
    p.add_argument("src", metavar="SRC", help="source data set folder (or a COCO .json file)")
    p.add_argument("out", metavar="OUT", help="output folder (the set lands in OUT/dataset/)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT/dataset (whole: no split of the old set is kept)",
    )

    p = _verb(
        sub,
        "download",
        cmd_data_download,
        help="download a Roboflow project version in the 'paligemma' format",
        description="Download through the optional 'roboflow' package (pip install\n"
        "'paligemma-xray[roboflow]'). The API key comes from ROBOFLOW_API_KEY or\n"
        "--api-key-file and is never printed or saved.",
    )
    p.add_argument("--workspace", required=True, metavar="W", help="Roboflow workspace id")
    p.add_argument("--project", required=True, metavar="P", help="Roboflow project id")
    p.add_argument("--version", required=True, type=int, metavar="V", help="project version number")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: ./<project>-<version>); the set lands in DIR/dataset/",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="F",
        help="file holding the API key (default: the ROBOFLOW_API_KEY environment variable)",
    )


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from paligemma_xray import train
    from paligemma_xray.report.progress import write_progress

    flags = {**train.recipes.overrides(args), "model": args.model, "data": args.data, "out": args.out}
    config = train.recipes.for_command(args.recipe, args.config, flags, resume=args.resume)
    try:
        summary = train.run(
            config, resume=args.resume is not None, overwrite=args.overwrite, on_validation=write_progress
        )
    except KeyboardInterrupt as stop:  # SIGINT or SIGTERM (train.Interrupted): saved, then stopped
        print(_train_interrupted(Path(config.out)), file=sys.stderr)
        return 143 if getattr(stop, "signal_name", "") == "SIGTERM" else 130
    best = (
        f"{summary.best_metric} {summary.best_value:.4f} at step {summary.best_step}"
        if (summary.best_value is not None)
        else "no evaluation"
    )
    final_loss = summary.final_loss
    if final_loss is None:  # a resume of a finished run trains no step: report its last loss
        final_loss = _last_train_loss(Path(summary.run_dir))
    if final_loss is None:
        print(f"nothing to train: {summary.run_dir} has no train steps logged, best {best}")
        return 0
    stopped = " (early stop)" if summary.stopped_early else ""
    print(
        f"trained {summary.steps} steps{stopped} into {summary.run_dir}: final loss {final_loss:.4f}, "
        f"best {best}"
    )
    return 0


def _last_train_loss(run_dir: Path) -> float | None:
    """The last logged training loss of a run (a resume of a finished run trains no step)."""
    loss = None
    try:
        with (run_dir / "metrics.jsonl").open() as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("kind") == "train" and isinstance(row.get("loss"), (int, float)):
                    loss = float(row["loss"])
    except OSError:
        return None
    return loss


def _train_interrupted(run_dir: Path) -> str:
    """What Ctrl-C leaves: the last checkpoint saved and the command that continues from it."""
    from paligemma_xray.train.run_folder import checkpoints

    saved = checkpoints(run_dir) if run_dir.is_dir() else []
    if not saved:
        if (run_dir / "config.yaml").is_file():
            return (
                f"interrupted before the first checkpoint of {run_dir}. "
                f"Start it again with: paligemma-xray train --resume {run_dir}"
            )
        return f"interrupted before {run_dir} was created: nothing to resume"
    step = saved[-1].name.split("-")[1]
    return (
        f"interrupted; the last checkpoint saved is step {step} ({saved[-1]}). "
        f"Continue with: paligemma-xray train --resume {run_dir}"
    )


def _add_train(verbs) -> None:
    from paligemma_xray.train.recipes import PRESETS, add_flags

    p = _verb(
        verbs,
        "train",
        cmd_train,
        help="fine-tune a PaliGemma checkpoint on a data set (resumable)",
        description="Fine-tune MODEL on DATA into the run folder OUT: config.yaml (the resolved\n"
        "recipe), metrics.jsonl, tb/, checkpoints/step-N/, best/ (the trained weights\n"
        "only, over MODEL) and last/ (a full HF folder, frozen weights in MODEL's dtype).\n"
        "With no flags this is big_vision's recipe: attention weights only, SGD lr 0.01,\n"
        "cosine with 10% warm-up, batch 8, 512 examples, text length 128.\n"
        "Values: preset (--recipe) < --config YAML < flags. Several GPUs:\n"
        "  torchrun --nproc_per_node N -m paligemma_xray.cli train ...",
    )
    p.add_argument("--model", metavar="M", help="base " + _MODEL_HELP)
    p.add_argument("--data", metavar="D", help="data set folder (Roboflow 'paligemma' export or similar)")
    p.add_argument("--out", metavar="RUN", help="run folder to create")
    p.add_argument(
        "--recipe",
        choices=list(PRESETS),
        default=None,
        help="preset to start from (default: big-vision, or the --config file's recipe:)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of recipe fields (applied over the preset)")
    p.add_argument(
        "--resume", metavar="RUN", help="continue the run in RUN exactly where its last checkpoint left it"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    add_flags(p)


# ---------------------------------------------------------------------------------------------
# predict / evaluate / report


def _detector(args: argparse.Namespace):
    from paligemma_xray.infer import Detector

    models = args.model if isinstance(args.model, list) else [args.model]
    detectors = [
        Detector.load(
            m,
            device=args.device,
            dtype=args.dtype,
            box_or_stop=not args.plain_greedy,
            min_box_probability=args.min_box_probability,
            batch_size=args.batch_size,
            revision=args.revision,
            attention=args.attention,
        )
        for m in models
    ]
    if len(detectors) == 1 and not args.tta and not args.merge_duplicates:
        return detectors[0]
    from paligemma_xray.infer.fusion import FusedDetector

    return FusedDetector(detectors, tta=args.tta or (), method=args.fusion, merge=args.merge_duplicates)


_MODEL_HELP = (
    "checkpoint: HF folder, big_vision .npz, run folder, or a model name: Hugging Face\n"
    "Hub id (google/paligemma2-3b-pt-224) or Kaggle handle\n"
    "(kaggle:google/paligemma/jax/paligemma-3b-pt-224)"
)


def _revision_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--revision",
        metavar="R",
        default=None,
        help="of a Hub id: branch, tag or commit (default main); of a kaggle: handle: version",
    )


def _detector_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="images decoded together (default 8)"
    )
    _model_flags(p, several=True)
    p.add_argument(
        "--tta",
        action="append",
        choices=["hflip"],
        default=None,
        help="test-time augmentation: also detect on the mirrored image and fuse the boxes\n"
        "(mirrored back) with the plain answer",
    )
    p.add_argument(
        "--fusion",
        choices=["wbf", "nms"],
        default="wbf",
        help="how several models' / views' boxes are fused: weighted box fusion (default)\n"
        "or non-maximum suppression (ensemble-boxes)",
    )
    p.add_argument(
        "--merge-duplicates",
        choices=["nms", "wbf"],
        default=None,
        help="merge each answer's own near-duplicate boxes (IoU >= 0.7) before anything else\n(default: off)",
    )


def _model_flags(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The flags of ``Detector.load`` (predict, evaluate, serve); ``several``: an ensemble may be given."""
    if several:
        p.add_argument(
            "--model",
            metavar="M",
            required=True,
            action="append",
            help=_MODEL_HELP + ";\ngive it several times for an ensemble, whose answers are\n"
            "fused per image (--fusion)",
        )
    else:
        p.add_argument("--model", metavar="M", required=True, help=_MODEL_HELP)
    _revision_flag(p)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="longest answer in tokens (default 64: about 8 boxes)",
    )
    p.add_argument(
        "--device", help="cpu, cuda, cuda:1 … (default: CUDA when available; one GPU per rank under torchrun)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights' dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--attention",
        choices=["sdpa", "eager"],
        default=None,
        help="attention kernel (default: transformers' own, sdpa; eager turns the fused\n"
        "kernel off, same tokens)",
    )
    p.add_argument(
        "--plain-greedy",
        action="store_true",
        help="turn off 'emit a box or stop' (all location tokens' total probability against "
        "EOS where a box may start): plain greedy decoding, as model.generate does",
    )
    p.add_argument(
        "--min-box-probability",
        type=float,
        default=None,
        metavar="P",
        help="also start a box where the location tokens together reach probability P although\n"
        "EOS is likelier, scored by that probability: candidates below the greedy\n"
        "operating point, so mAP and FROC see the whole precision-recall curve\n"
        "(e.g. 0.05; default: only where they beat EOS)",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from paligemma_xray.infer.detector import is_detection_prompt
    from paligemma_xray.infer.predict import check_inputs, predict

    check_inputs(
        args.paths,
        args.out,
        threshold=args.threshold,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    detector = _detector(args)
    free_form = not is_detection_prompt(args.prompt)
    threshold = args.threshold
    saved = getattr(detector, "calibration", None)
    if threshold is None and saved is not None and saved.threshold is not None and not free_form:
        threshold = saved.threshold
        print(
            f"threshold {threshold:.3g}: the operating point saved with the model ({saved.operating_point})",
            file=sys.stderr,
        )
    summary = predict(
        detector,
        args.paths,
        args.out,
        prompt=args.prompt,
        threshold=threshold,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        resume=args.resume,
        overwrite=args.overwrite,
        annotated=not args.no_images,
        dicom_sr=args.dicom_sr,
        secondary_capture=args.secondary_capture,
        workers=args.workers,
        on_answer=(lambda name, text: print(f"{name}\t{text.strip()}", flush=True)) if free_form else None,
    )
    if "images" in summary:
        notes = "".join(
            f", {summary[key]} {what}"
            for key, what in (
                ("already_done", "done before (--resume)"),
                ("duplicates", "given twice, predicted once"),
            )
            if summary.get(key)
        )
        print(
            f"predicted {summary['predicted']} image(s) into {summary['out']} "
            f"({summary['images']} with detections files, {summary['boxes']} boxes{notes})",
            file=sys.stderr,
        )
    if "dicom_sr" in summary:
        print(
            f"wrote DICOM for {summary['dicom_sr']} DICOM image(s); {summary['not_dicom']} input(s) "
            "were not DICOM and got none",
            file=sys.stderr,
        )
    return 0


def _add_predict(verbs) -> None:
    p = _verb(
        verbs,
        "predict",
        cmd_predict,
        help="detect fractures (or answer a prompt) on images, folders and DICOM files",
        description="Run MODEL on every image under PATH… (files, folders walked recursively, DICOM).\n"
        "Writes OUT/json/<name>.json per image (boxes, scores, text, token log-probs),\n"
        "OUT/annotated/<name>.png, and OUT/predictions.coco.json (COCO results) with\n"
        "OUT/images.json; <name> is the input's path relative to the folder holding\n"
        "all inputs. OUT/manifest.json records the model (and its checksum), prompt and\n"
        "decoding flags. Streams folders of any size; --resume skips images done.\n"
        "Free-form prompts ('caption en', 'answer en …') print NAME<TAB>ANSWER lines.\n"
        "Several GPUs: torchrun --nproc_per_node N -m paligemma_xray.cli predict …",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, DICOM file or folder")
    _detector_flags(p)
    p.add_argument(
        "--out", default="predictions", metavar="DIR", help="output folder (default ./predictions)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="keep boxes scored at least T (default: the operating point saved with the model\n"
        "by `evaluate --operating-point`, else keep all; 0 keeps all)",
    )
    p.add_argument(
        "--prompt",
        default="detect fracture",
        metavar="P",
        help="prompt (default 'detect fracture'; e.g. 'caption en', 'answer en is there a fracture?')",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT: skip images whose OUT/json file exists (refused if OUT was made\n"
        "with another model, prompt or decoding flags)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results already in OUT")
    p.add_argument("--no-images", action="store_true", help="do not write annotated PNGs")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads decoding the next images, and as many writing the finished ones' files,\n"
        "while the model works (default: up to 4; 0: all on the main thread)",
    )
    p.add_argument(
        "--dicom-sr",
        action="store_true",
        help="for each DICOM input also write OUT/dicom-sr/<name>.sr.dcm: a DICOM Structured\n"
        "Report (TID 1500) with one region per box, for PACS and viewers",
    )
    p.add_argument(
        "--secondary-capture",
        action="store_true",
        help="for each DICOM input also write OUT/dicom-sc/<name>.sc.dcm: the image with its\n"
        "boxes drawn, as a DICOM Secondary Capture (for viewers without SR)",
    )


def cmd_pacs(args: argparse.Namespace) -> int:
    from paligemma_xray import pacs

    credentials = pacs.load_credentials(args.credentials)
    since, modalities = pacs.parse_since(args.since), pacs.parse_modalities(args.modality)
    pacs.connect(args.url, credentials)  # a bad URL is refused before the model loads
    detector = _detector(args)
    totals = pacs.run(
        detector,
        args.url,
        studies=args.study,
        since=since,
        modalities=modalities,
        prompt=args.prompt,
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        secondary_capture=args.secondary_capture,
        state_path=args.state,
        credentials=credentials,
        retries=args.retries,
        backoff_s=args.backoff,
        timeout_s=args.timeout,
        watch=args.watch,
        interval_s=args.interval,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(
        f"pacs: {totals['studies']} study(ies) processed, {totals['images']} image(s) detected, "
        f"{totals['srs']} SR(s) stored; skipped {totals['skipped_studies']} study(ies) and "
        f"{totals['skipped_images']} image(s) that already had our report",
        file=sys.stderr,
    )
    return 0


def _add_pacs(verbs) -> None:
    from paligemma_xray import pacs

    p = _verb(
        verbs,
        "pacs",
        cmd_pacs,
        help="detect on a PACS's radiographs over DICOMweb and store DICOM SRs back",
        description="Query studies on the DICOMweb server URL (QIDO-RS), retrieve their CR/DX images\n"
        "(WADO-RS), detect, and store one DICOM SR per image back in the study\n"
        "(STOW-RS), in a series of its own. Never changes or deletes anything else.\n"
        "Idempotent (images that already have our SR for this model are skipped) and\n"
        "resumable (--state). Credentials: $"
        + pacs.ENV_USER
        + " and $"
        + pacs.ENV_PASSWORD
        + ",\nor $"
        + pacs.ENV_TOKEN
        + ", or --credentials FILE; never printed.",
    )
    p.add_argument(
        "--url", required=True, metavar="URL", help="DICOMweb root, e.g. http://orthanc:8042/dicom-web"
    )
    p.add_argument(
        "--study",
        action="append",
        metavar="UID",
        help="only this Study Instance UID (repeatable; default: every study)",
    )
    p.add_argument("--since", metavar="DATE", help="only studies from DATE (YYYY-MM-DD) on, by Study Date")
    p.add_argument(
        "--modality",
        default=",".join(pacs.DEFAULT_MODALITIES),
        metavar="M,M",
        help="series modalities to detect on (default CR,DX)",
    )
    _detector_flags(p)
    p.add_argument("--prompt", default="detect fracture", metavar="P", help="detection prompt")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="report boxes scored at least T (default: all)",
    )
    p.add_argument(
        "--secondary-capture",
        action="store_true",
        help="also store the image with its boxes drawn (Secondary Capture)",
    )
    p.add_argument(
        "--state",
        default="pacs-state.json",
        metavar="FILE",
        help="progress file for resuming (default ./pacs-state.json)",
    )
    p.add_argument(
        "--credentials", metavar="FILE", help='JSON file {"user": …, "password": …} or {"token": …}'
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries of a failed request, with exponential backoff (default 5)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="S",
        help="first wait between retries in seconds, doubled each time (default 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for one HTTP answer (default 60)",
    )
    p.add_argument("--watch", action="store_true", help="keep polling for new studies (Ctrl-C stops)")
    p.add_argument(
        "--interval",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between polls with --watch (default 60)",
    )


def _outside_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="use records whose image lies outside the data set's folder (../.., absolute\n"
        "paths, symlinks pointing out); by default they are skipped as errors",
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from paligemma_xray.data import open_dataset
    from paligemma_xray.evaluate import evaluate
    from paligemma_xray.evaluate.compare import check_compare, write_comparison
    from paligemma_xray.evaluate.runner import check_evaluation
    from paligemma_xray.infer.detector import check_decoding
    from paligemma_xray.infer.distributed import world

    # Everything that needs no model first: a typo must not cost the model's loading time.
    check_decoding(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    dataset = open_dataset(args.data, allow_outside_images=args.allow_outside_images)
    check_evaluation(
        dataset,
        args.split,
        args.out,
        threshold=args.threshold,
        iou_threshold=args.iou,
        bootstrap=args.bootstrap,
        overwrite=args.overwrite,
        max_bad_records=args.max_bad_records,
        operating_point=args.operating_point,
        calibration_method=args.calibration,
    )
    if args.compare:
        check_compare(args.compare)
    if args.run and not Path(args.run).is_dir():
        from paligemma_xray.errors import ConfigError

        raise ConfigError("no such training run folder (--run)", path=args.run)
    detector = _detector(args)
    single = len(args.model) == 1 and not args.tta and not args.merge_duplicates
    # Saved beside local weights only (a Hub id or kaggle: handle has no folder of ours).
    local = single and Path(args.model[0]).exists()
    save_with = args.model[0] if local and not args.no_save_calibration else None
    metrics = evaluate(
        detector,
        dataset,
        args.split,
        args.out,
        threshold=args.threshold,
        iou_threshold=args.iou,
        operating_point=args.operating_point,
        calibration_method=args.calibration,
        save_with_model=save_with,
        bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite,
        max_bad_records=args.max_bad_records,
    )
    if world().is_main:
        from paligemma_xray.report import write_report

        if args.compare is not None:
            write_comparison(args.out, args.compare, bootstrap=args.bootstrap, seed=args.seed)
        report = write_report(args.out, run_dir=args.run, compare=args.compare)
        print(json.dumps(headline(metrics)))
        if save_with is not None and args.operating_point is not None:
            from paligemma_xray.infer.calibration import calibration_path

            print(
                f"calibration and operating point saved with the model: {calibration_path(save_with)}",
                file=sys.stderr,
            )
        print(f"metrics: {Path(args.out) / 'metrics.json'}\nreport:  {report}", file=sys.stderr)
    return 0


def headline(metrics: dict) -> dict:
    """The line `evaluate` prints: threshold-free figures first, then those at its threshold."""
    point = metrics.get("operating_point") or {}
    threshold = metrics.get("threshold")
    return {
        "map50": metrics.get("map50"),
        "map50_95": metrics.get("map50_95"),
        "map10_50": metrics.get("map10_50"),
        "froc_score": metrics.get("froc", {}).get("score"),
        "image_auc": metrics.get("image_level", {}).get("auc"),
        "threshold": None if threshold is None else float(f"{threshold:.3g}"),
        "threshold_source": point.get("name") or metrics.get("threshold_source"),
        "iou": metrics.get("iou_threshold"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "image_sensitivity": metrics.get("image_level", {}).get("sensitivity"),
        "image_specificity": metrics.get("image_level", {}).get("specificity"),
        "duplicate_boxes": metrics.get("duplicates", {}).get("boxes"),
    }


def _add_evaluate(verbs) -> None:
    p = _verb(
        verbs,
        "evaluate",
        cmd_evaluate,
        help="score a model on a data set split: metrics.json, predictions and the HTML report",
        description="Detect on every image of SPLIT of data set D and write into OUT:\n"
        "metrics.json (mAP@0.5, mAP@[.5:.95], mAP@[.1:.5] (nnDetection's medical mAP),\n"
        "AP per class, precision/recall/F1 at the threshold, FROC and its CPM score,\n"
        "image-level sensitivity/specificity/AUC, calibration, bootstrap 95% CIs,\n"
        "duplicate boxes, parse failures), predictions.jsonl, COCO files, report.html.\n"
        "--operating-point chooses the threshold on the valid split, fits the calibrated\n"
        "probabilities there, and saves both with the model (calibration.json), which\n"
        "predict and serve then default to.\n"
        "Several GPUs: torchrun --nproc_per_node N -m paligemma_xray.cli evaluate …",
    )
    _detector_flags(p)
    p.add_argument("--data", metavar="D", required=True, help="data set folder")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split (default test)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="score threshold for precision/recall/F1 and image level (default: the\n"
        "--operating-point, else the one saved with the model, else this split's best F1,\n"
        "labelled as such)",
    )
    p.add_argument(
        "--operating-point",
        metavar="P",
        default=None,
        help="f1 | sensitivity=S | specificity=S: choose the threshold on the valid split\n"
        "(best box F1, or the image-level sensitivity / specificity target), fit the\n"
        "calibration there, report this split at it, and save both with the model",
    )
    p.add_argument(
        "--calibration",
        choices=["platt", "isotonic"],
        default="platt",
        help="calibration method fitted with --operating-point (default platt: logistic\n"
        "regression on the score's logit, robust on small validation sets)",
    )
    p.add_argument(
        "--no-save-calibration",
        action="store_true",
        help="do not write calibration.json beside the model (it is still in OUT)",
    )
    p.add_argument(
        "--iou",
        type=float,
        default=0.5,
        metavar="T",
        help="IoU of a hit for precision/recall, FROC, image level and the calibration\n"
        "(default 0.5; 0.1 is the usual medical criterion). mAP keeps COCO's thresholds",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% intervals (default 1000; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--compare",
        metavar="DIR",
        help="another evaluation folder of the same images: the report puts it beside this one\n"
        "and compares the two (paired bootstrap differences in mAP, FROC, sensitivity and\n"
        "specificity with p-values; DeLong's test of the image AUC): comparison.json",
    )
    p.add_argument("--run", metavar="RUN", help="training run folder: adds its loss curve to the report")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in OUT")
    p.add_argument(
        "--max-bad-records",
        type=int,
        default=10,
        metavar="N",
        help="skip (and count) records whose image cannot be decoded; stop past N (default 10)",
    )
    _outside_flag(p)


def cmd_report(args: argparse.Namespace) -> int:
    from paligemma_xray.report import write_report

    path = write_report(
        args.eval_dir,
        args.out,
        run_dir=args.run,
        compare=args.compare,
        names=(args.name, args.compare_name),
        gallery=args.gallery,
    )
    print(path)
    return 0


def _add_report(verbs) -> None:
    p = _verb(
        verbs,
        "report",
        cmd_report,
        help="rebuild the self-contained HTML report from an evaluation folder",
        description="Build ONE self-contained HTML file (no external assets) from EVAL_DIR's\n"
        "metrics.json and predictions.jsonl: metrics with CIs, PR and FROC curves,\n"
        "the loss curve of --run, and a gallery worst first. --compare puts a second\n"
        "evaluation (e.g. before fine-tuning) side by side.",
    )
    p.add_argument("eval_dir", metavar="EVAL_DIR", help="folder written by `paligemma-xray evaluate`")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default EVAL_DIR/report.html)")
    p.add_argument(
        "--compare", "--compare-with", metavar="DIR", help="second evaluation folder, side by side"
    )
    p.add_argument(
        "--run", metavar="RUN", help="training run folder (its metrics.jsonl gives the loss curve)"
    )
    p.add_argument("--name", help="column title of EVAL_DIR (default: its model)")
    p.add_argument("--compare-name", help="column title of --compare (default: its model)")
    p.add_argument("--gallery", type=int, default=24, metavar="N", help="images in the gallery (default 24)")


def cmd_serve(args: argparse.Namespace) -> int:
    from paligemma_xray.serve import ServeConfig, api_key_from_env, serve

    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue=args.queue,
        max_upload_mb=args.max_upload_mb,
        max_new_tokens=args.max_new_tokens,
        api_key=api_key_from_env(),
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        config=config,
        device=args.device,
        dtype=args.dtype,
        box_or_stop=not args.plain_greedy,
        min_box_probability=args.min_box_probability,
        log_level=args.log_level,
        revision=args.revision,
        attention=args.attention,
    )
    return 0


def _add_serve(verbs) -> None:
    p = _verb(
        verbs,
        "serve",
        cmd_serve,
        help="serve a model over HTTP: JSON API and a browser page",
        description="Serve MODEL on http://HOST:PORT: the page at / (drop an X-ray, see boxes,\n"
        "move a threshold), POST /v1/detect (multipart 'file': image or DICOM; optional\n"
        "'prompt', 'threshold'), GET /v1/model, GET /healthz, OpenAPI at /docs.\n"
        "Concurrent requests share model calls (up to --max-batch images, waiting at\n"
        "most --max-wait-ms for companions); past --queue waiting: 503 + Retry-After.\n"
        "API key: set PALIGEMMA_XRAY_API_KEY to require it (X-API-Key or Authorization:\n"
        "Bearer) on /v1/*; it is never printed or logged. Uploads stay in memory.",
    )
    _model_flags(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="B",
        help="most images per model call (default 8; 1 turns batching off)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="longest a request waits for others to share its model call (default 10)",
    )
    p.add_argument(
        "--queue",
        type=int,
        default=64,
        metavar="N",
        help="requests that may wait for the model; more get 503 (default 64)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=32.0,
        metavar="MB",
        help="largest upload accepted, checked while it arrives (default 32)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default info)",
    )


# ---------------------------------------------------------------------------------------------
# convert


def cmd_convert(args: argparse.Namespace) -> int:
    from paligemma_xray.model.checkpoints import convert

    print(
        convert(
            args.src,
            args.out,
            to=args.to,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            revision=args.revision,
            overwrite=args.overwrite,
        )
    )
    return 0


def _add_convert(verbs) -> None:
    p = _verb(
        verbs,
        "convert",
        cmd_convert,
        help="convert a checkpoint: big_vision .npz <-> Hugging Face folder",
        description="Read IN (big_vision .npz + SentencePiece tokenizer, HF folder, LoRA adapter\n"
        "folder (merged into its base), or a run folder: best/, else last/) and write OUT\n"
        "as an HF save_pretrained folder or a big_vision .npz (its keys, shapes and\n"
        "dtype; bfloat16 stored as |V2; embedding cut back to the SentencePiece size).\n"
        "Sizes, depth, heads, resolution and PaliGemma 1/2 are read from the weights.",
    )
    p.add_argument("src", metavar="IN", help="checkpoint to read (path, Hub id or kaggle: handle)")
    _revision_flag(p)
    p.add_argument("out", metavar="OUT", help="HF folder or .npz file to write")
    p.add_argument(
        "--to",
        choices=["hf", "npz"],
        default=None,
        help="output format (default: npz if OUT ends in .npz, else hf)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="dtype of the written weights (default: the input's)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="F",
        help="SentencePiece .model for an npz input (default: paligemma_tokenizer.model or "
        "tokenizer.model beside it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


# ---------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from paligemma_xray.demo import DemoSettings, format_summary, run_demo

    settings = DemoSettings(seed=args.seed, minutes=args.minutes, threads=args.threads)
    if args.images is not None:
        settings.train_images = args.images
    result = run_demo(args.out, settings, base=args.base, overwrite=args.overwrite)
    print(format_summary(result))
    return 0


def cmd_demo_pretrain(args: argparse.Namespace) -> int:
    from paligemma_xray.demo import PretrainSettings, pretrain

    settings = PretrainSettings(seed=args.seed, threads=args.threads)
    if args.examples is not None:
        settings.examples = args.examples
    if args.images is not None:
        settings.train_images = args.images
    summary = pretrain(args.out, settings, work=args.work)
    minutes = summary.seconds / 60
    print(f"base model: {summary.out} ({summary.bytes / 1e6:.2f} MB float16) in {minutes:.1f} min")
    print(f"validation (shapes): {summary.valid}")
    return 0


def _add_demo(verbs) -> None:
    p = _verb(
        verbs,
        "demo",
        cmd_demo,
        help="fine-tune the shipped small base model to find synthetic fractures (CPU, ~10 min)",
        description="Generate a synthetic fracture set, evaluate the shipped base model (pretrained\n"
        "on shapes, never on radiographs) on its test split, fine-tune it with the\n"
        "training engine, evaluate again, and write OUT/report.html (before and after),\n"
        "OUT/model/ (HF) and OUT/model.npz (big_vision), and OUT/metrics.json.\n"
        "No network. Deterministic for a given --seed and --minutes.\n\n"
        "  paligemma-xray demo pretrain --out DIR   rebuilds the base model (see --help).",
    )
    from paligemma_xray.demo.run import DemoSettings

    demo_defaults = DemoSettings()
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: ./demo-out)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in DIR")
    p.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        metavar="N",
        help="time budget on a 2-core CPU; sets how many examples are trained on, at a fixed\n"
        "nominal rate (not by the clock, so runs repeat exactly) (default: 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training order (default: 0)")
    p.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help=f"training images to generate (default: {demo_defaults.train_images})",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="PATH",
        help="model to start from (default: the base model shipped in the package)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=demo_defaults.threads,
        metavar="N",
        help=f"CPU threads for torch (default: {demo_defaults.threads}, for a 2-core machine\n"
        "the demo has to itself; use 1 on a busy one, where 2 threads ran 10x slower).\n"
        "Float sums, hence results, depend on the thread count",
    )
    from paligemma_xray.demo.base import PretrainSettings

    defaults = PretrainSettings()
    sub = p.add_subparsers(title="demo verbs (optional)", metavar="[pretrain]")
    q = _verb(
        sub,
        "pretrain",
        cmd_demo_pretrain,
        help="rebuild the demo's base model: pretrain on synthetic shapes (about 35 min, 1 CPU core)",
        description="Pretrain the demo's small PaliGemma (the real architecture and tokenizer layout)\n"
        "on synthetic shapes ('detect circle', 'detect ring ; line', ...): stage 1 warms\n"
        "up the vision tower with a dense per-patch objective, stage 2 trains the decoder\n"
        "on detection text through the training engine. Writes OUT as float16\n"
        "safetensors with its tokenizer and config. The shipped base model is exactly:\n"
        "  paligemma-xray demo pretrain --out src/paligemma_xray/assets/demo-base\n"
        "Deterministic for a given seed, torch version and thread count.",
    )
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write the base model to (replaced)")
    q.add_argument("--seed", type=int, default=0, help="seed of data, initial weights and order (default: 0)")
    q.add_argument(
        "--examples",
        type=int,
        default=None,
        metavar="N",
        help=f"stage-2 training examples in total (default: {defaults.examples})",
    )
    q.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help=f"distinct training images generated (default: {defaults.train_images})",
    )
    q.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads; part of the recipe, float32 sums depend on it (default: 1)",
    )
    q.add_argument(
        "--work",
        default=None,
        metavar="DIR",
        help="keep the shapes data and the training run here (default: a temporary folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="paligemma-xray",
        description="Fine-tune, evaluate and serve PaliGemma bone-fracture detectors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(title="verbs", metavar="VERB")
    verbs.required = True
    for add in _VERBS:
        add(verbs)
    return parser


# Each entry adds one top-level verb (with its own sub-verbs where it has them).
_VERBS: list[Callable] = [
    _add_data,
    _add_convert,
    _add_train,
    _add_predict,
    _add_evaluate,
    _add_report,
    _add_serve,
    _add_demo,
    _add_pacs,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from paligemma_xray import progress

    shown = progress.is_enabled()
    progress.set_enabled(shown and not getattr(args, "no_progress", False))
    try:
        return int(args.handler(args) or 0)
    except PaligemmaXrayError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        progress.set_enabled(shown)  # main() called in-process (tests, notebooks) leaves it as it was


if __name__ == "__main__":
    sys.exit(main())
