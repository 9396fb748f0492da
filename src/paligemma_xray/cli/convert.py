"""``paligemma-xray convert IN OUT``: big_vision .npz <-> Hugging Face folder."""

from __future__ import annotations

import argparse
from typing import Any

from paligemma_xray.cli.parser import verb

EXAMPLES = [
    "paligemma-xray convert pt_224.npz hf-model/",
    "paligemma-xray convert runs/r1 r1.npz --dtype bfloat16",
]


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


def register(verbs: Any) -> None:
    p = verb(
        verbs,
        "convert",
        cmd_convert,
        help="convert a checkpoint: big_vision .npz <-> Hugging Face folder",
        description="Read IN (big_vision .npz + SentencePiece tokenizer, HF folder, LoRA adapter\n"
        "folder (merged into its base), or a run folder: best/, else last/) and write OUT\n"
        "as an HF save_pretrained folder or a big_vision .npz (its keys, shapes and\n"
        "dtype; bfloat16 stored as |V2; embedding cut back to the SentencePiece size).\n"
        "Sizes, depth, heads, resolution and PaliGemma 1/2 are read from the weights.",
        examples=EXAMPLES,
    )
    p.add_argument("src", metavar="IN", help="checkpoint to read (path, Hub id or kaggle: handle)")
    p.add_argument(
        "--revision",
        metavar="R",
        default=None,
        help="of a Hub id: branch, tag or commit (default main); of a kaggle: handle: version",
    )
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
