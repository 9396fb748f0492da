"""``paligemma-xray convert IN OUT``: big_vision .npz <-> Hugging Face folder."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic.dataclasses import dataclass

from paligemma_xray.cli.parser import verb
from paligemma_xray.settings import SETTINGS_CONFIG, flag

EXAMPLES = [
    "paligemma-xray convert pt_224.npz hf-model/",
    "paligemma-xray convert runs/r1 r1.npz --dtype bfloat16",
]


@dataclass(config=SETTINGS_CONFIG)
class ConvertSettings:
    """``convert``: read a checkpoint in any form, write it as an HF folder or a big_vision .npz."""

    src: Annotated[str, flag(positional=True, metavar="IN", required=True)] = ""
    """Checkpoint to read (path, Hub id or kaggle: handle)."""
    out: Annotated[str, flag(positional=True, metavar="OUT", required=True)] = ""
    """HF folder or .npz file to write."""
    revision: Annotated[str | None, flag(metavar="R")] = None
    """Of a Hub id: branch, tag or commit (default main); of a kaggle: handle: version."""
    to: Literal["hf", "npz"] | None = None
    """Output format (default: npz if OUT ends in .npz, else hf)."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Dtype of the written weights (default: the input's)."""
    tokenizer: Annotated[str | None, flag(metavar="F")] = None
    """SentencePiece .model for an npz input (default: paligemma_tokenizer.model or
    tokenizer.model beside it)."""
    overwrite: bool = False
    """Replace OUT if it exists."""


def convert(settings: ConvertSettings) -> int:
    from paligemma_xray.model import convert

    print(
        convert(
            settings.src,
            settings.out,
            to=settings.to,
            dtype=settings.dtype,
            tokenizer=settings.tokenizer,
            revision=settings.revision,
            overwrite=settings.overwrite,
        )
    )
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "convert",
        convert,
        help="convert a checkpoint: big_vision .npz <-> Hugging Face folder",
        description="Read IN (big_vision .npz + SentencePiece tokenizer, HF folder, LoRA adapter\n"
        "folder (merged into its base), or a run folder: best/, else last/) and write OUT\n"
        "as an HF save_pretrained folder or a big_vision .npz (its keys, shapes and\n"
        "dtype; bfloat16 stored as |V2; embedding cut back to the SentencePiece size).\n"
        "Sizes, depth, heads, resolution and PaliGemma 1/2 are read from the weights.",
        examples=EXAMPLES,
        settings=ConvertSettings,
    )
