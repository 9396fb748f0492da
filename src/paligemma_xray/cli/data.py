"""``paligemma-xray data {synth,check,import,download}``: make, check, import, download data sets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic.dataclasses import dataclass

from paligemma_xray.cli.parser import verb
from paligemma_xray.settings import SETTINGS_CONFIG, flag

EXAMPLES = {
    "synth": [
        "paligemma-xray data synth synth-data --n 200",
        "paligemma-xray data synth synth-data --n 50 --overwrite   # replace the set",
    ],
    "check": ["paligemma-xray data check my-set --html check.html"],
    "import": ["paligemma-xray data import --format coco coco-export/ my-set"],
    "download": ["paligemma-xray data download --workspace W --project P --version 1"],
}


@dataclass(config=SETTINGS_CONFIG)
class SynthSettings:
    """``data synth``: a deterministic synthetic fracture set."""

    out: Annotated[str, flag(positional=True, metavar="OUT", required=True)] = ""
    """Output folder (created; the set lands in OUT/dataset/)."""
    n: Annotated[int, flag(metavar="N")] = 200
    """Number of images."""
    seed: int = 0
    """Random seed; same seed, same files."""
    size: Annotated[int, flag(metavar="PX")] = 448
    """Image side in pixels."""
    format: Literal["jpg", "png"] = "jpg"
    """Image file format."""
    overwrite: bool = False
    """Replace an existing OUT/dataset (whole: the two sets are never merged)."""


@dataclass(config=SETTINGS_CONFIG)
class CheckSettings:
    """``data check``: counts, problems with file and line, leakage, gallery."""

    dir: Annotated[str, flag(positional=True, metavar="DIR", required=True)] = ""
    """Data set folder, its dataset/ folder, or a .jsonl file."""
    json: Annotated[str | None, flag(metavar="FILE")] = None
    """Write the full report as JSON to FILE."""
    html: Annotated[str | None, flag(metavar="FILE")] = None
    """Write a self-contained HTML report with a gallery to FILE."""
    gallery: Annotated[int, flag(metavar="N")] = 16
    """Number of example images with boxes drawn in the HTML report."""
    allow_outside_images: bool = False
    """Use records whose image lies outside the data set's folder (../.., absolute paths,
    symlinks pointing out); by default they are skipped as errors."""


@dataclass(config=SETTINGS_CONFIG)
class ImportSettings:
    """``data import``: a COCO, YOLO or Pascal VOC set in the Roboflow 'paligemma' layout."""

    format: Annotated[Literal["coco", "yolo", "voc"] | None, flag(required=True)] = None
    """Format of SRC."""
    src: Annotated[str, flag(positional=True, metavar="SRC", required=True)] = ""
    """Source data set folder (or a COCO .json file)."""
    out: Annotated[str, flag(positional=True, metavar="OUT", required=True)] = ""
    """Output folder (the set lands in OUT/dataset/)."""
    overwrite: bool = False
    """Replace an existing OUT/dataset (whole: no split of the old set is kept)."""
    seg_vae: Annotated[str | None, flag(metavar="NPZ")] = None
    """COCO only: encode each object's polygon mask into 16 <seg> codes with big_vision's
    mask encoder (encoder.* of vae-oid.npz); prefix 'segment a ; b'."""


@dataclass(config=SETTINGS_CONFIG)
class DownloadSettings:
    """``data download``: a Roboflow project version in the 'paligemma' format."""

    workspace: Annotated[str, flag(metavar="W", required=True)] = ""
    """Roboflow workspace id."""
    project: Annotated[str, flag(metavar="P", required=True)] = ""
    """Roboflow project id."""
    version: Annotated[int | None, flag(metavar="V", required=True)] = None
    """Project version number."""
    out: Annotated[str | None, flag(metavar="DIR")] = None
    """Output folder (default: ./<project>-<version>); the set lands in DIR/dataset/."""
    api_key_file: Annotated[str | None, flag(metavar="F")] = None
    """File holding the API key (default: the ROBOFLOW_API_KEY environment variable)."""


def synth(settings: SynthSettings) -> int:
    from paligemma_xray.data.synth import generate

    root = generate(
        settings.out,
        n=settings.n,
        seed=settings.seed,
        size=settings.size,
        image_format=settings.format,
        overwrite=settings.overwrite,
    )
    print(f"wrote {settings.n} synthetic radiographs to {root / 'dataset'}")
    return 0


def check(settings: CheckSettings) -> int:
    from paligemma_xray.data.check import check_dataset

    report = check_dataset(
        settings.dir,
        json_path=settings.json,
        html_path=settings.html,
        gallery=settings.gallery,
        allow_outside_images=settings.allow_outside_images,
    )
    print(report.summary())
    return report.exit_code


def import_(settings: ImportSettings) -> int:
    from paligemma_xray.data.importers import import_dataset

    assert settings.format is not None  # required
    mask_encoder = None
    if settings.seg_vae:  # COCO polygons → <seg> codes with big_vision's mask encoder
        from paligemma_xray.infer.masks import MaskEncoder

        encoder = MaskEncoder.load(settings.seg_vae)

        def mask_encoder(crops: Any) -> Any:
            return encoder(crops).numpy()

    result = import_dataset(
        settings.format, settings.src, settings.out, overwrite=settings.overwrite, mask_encoder=mask_encoder
    )
    print(result.summary())
    return 0


def download(settings: DownloadSettings) -> int:
    from paligemma_xray.data.download import download

    assert settings.version is not None  # required
    root = download(
        settings.workspace,
        settings.project,
        settings.version,
        out=settings.out,
        api_key_file=settings.api_key_file,
    )
    print(f"downloaded {settings.workspace}/{settings.project} version {settings.version} to {root}")
    return 0


def register(verbs: Any) -> None:
    data = verbs.add_parser(
        "data",
        help="data sets: make a synthetic set, check, import, download",
        description="Data sets in the Roboflow 'paligemma' JSONL layout: make, check, import, download.",
    )
    sub = data.add_subparsers(title="data verbs", metavar="DATA_VERB")
    sub.required = True

    verb(
        sub,
        "synth",
        synth,
        help="write a deterministic synthetic fracture data set (Roboflow layout)",
        description="Render X-ray-like radiographs with fracture lines and their boxes, written as\n"
        "OUT/dataset/_annotations.{train,valid,test}.jsonl plus images (70/15/15 split).\n"
        "The same --seed gives the same bytes.",
        examples=EXAMPLES["synth"],
        settings=SynthSettings,
    )

    verb(
        sub,
        "check",
        check,
        help="check a data set: counts, problems with file and line, leakage, gallery",
        description="Read a data set (Roboflow export, maestro layout or plain JSONL), decode every\n"
        "image and report counts per split and every problem with its file and line,\n"
        "including duplicate and near-duplicate images across splits (leakage).\n\n"
        "Exit code: 0 clean, 1 problems found, 2 no usable data set.",
        examples=EXAMPLES["check"],
        settings=CheckSettings,
    )

    verb(
        sub,
        "import",
        import_,
        help="convert a COCO, YOLO or Pascal VOC detection set to the Roboflow 'paligemma' layout",
        description="Convert a detection data set into OUT/dataset/_annotations.<split>.jsonl\n"
        "+ images, "
        "prefix 'detect a ; b' listing the classes. Split folders (train/valid/test)\n"
        "are kept; a set without them becomes the train split.",
        examples=EXAMPLES["import"],
        settings=ImportSettings,
    )

    verb(
        sub,
        "download",
        download,
        help="download a Roboflow project version in the 'paligemma' format",
        description="Download through the optional 'roboflow' package (pip install\n"
        "'paligemma-xray[roboflow]'). The API key comes from ROBOFLOW_API_KEY or\n"
        "--api-key-file and is never printed or saved.",
        examples=EXAMPLES["download"],
        settings=DownloadSettings,
    )
