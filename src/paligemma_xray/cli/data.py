"""``paligemma-xray data {synth,check,import,download}``: make, check, import, download data sets."""

from __future__ import annotations

import argparse
from typing import Any

from paligemma_xray.cli.parser import verb

EXAMPLES = {
    "synth": [
        "paligemma-xray data synth synth-data --n 200",
        "paligemma-xray data synth synth-data --n 50 --overwrite   # replace the set",
    ],
    "check": ["paligemma-xray data check my-set --html check.html"],
    "import": ["paligemma-xray data import --format coco coco-export/ my-set"],
    "download": ["paligemma-xray data download --workspace W --project P --version 1"],
}


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


def register(verbs: Any) -> None:
    data = verbs.add_parser(
        "data",
        help="data sets: make a synthetic set, check, import, download",
        description="Data sets in the Roboflow 'paligemma' JSONL layout: make, check, import, download.",
    )
    sub = data.add_subparsers(title="data verbs", metavar="DATA_VERB")
    sub.required = True

    p = verb(
        sub,
        "synth",
        cmd_data_synth,
        help="write a deterministic synthetic fracture data set (Roboflow layout)",
        description="Render X-ray-like radiographs with fracture lines and their boxes, written as\n"
        "OUT/dataset/_annotations.{train,valid,test}.jsonl plus images (70/15/15 split).\n"
        "The same --seed gives the same bytes.",
        examples=EXAMPLES["synth"],
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

    p = verb(
        sub,
        "check",
        cmd_data_check,
        help="check a data set: counts, problems with file and line, leakage, gallery",
        description="Read a data set (Roboflow export, maestro layout or plain JSONL), decode every\n"
        "image and report counts per split and every problem with its file and line,\n"
        "including duplicate and near-duplicate images across splits (leakage).\n\n"
        "Exit code: 0 clean, 1 problems found, 2 no usable data set.",
        examples=EXAMPLES["check"],
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
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="use records whose image lies outside the data set's folder (../.., absolute\n"
        "paths, symlinks pointing out); by default they are skipped as errors",
    )

    p = verb(
        sub,
        "import",
        cmd_data_import,
        help="convert a COCO, YOLO or Pascal VOC detection set to the Roboflow 'paligemma' layout",
        description="Convert a detection data set into OUT/dataset/_annotations.<split>.jsonl\n"
        "+ images, "
        "prefix 'detect a ; b' listing the classes. Split folders (train/valid/test)\n"
        "are kept; a set without them becomes the train split.",
        examples=EXAMPLES["import"],
    )
    p.add_argument("--format", required=True, choices=("coco", "yolo", "voc"), help="format of SRC")
    p.add_argument("src", metavar="SRC", help="source data set folder (or a COCO .json file)")
    p.add_argument("out", metavar="OUT", help="output folder (the set lands in OUT/dataset/)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT/dataset (whole: no split of the old set is kept)",
    )

    p = verb(
        sub,
        "download",
        cmd_data_download,
        help="download a Roboflow project version in the 'paligemma' format",
        description="Download through the optional 'roboflow' package (pip install\n"
        "'paligemma-xray[roboflow]'). The API key comes from ROBOFLOW_API_KEY or\n"
        "--api-key-file and is never printed or saved.",
        examples=EXAMPLES["download"],
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
