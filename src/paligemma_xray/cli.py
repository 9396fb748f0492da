"""Command line: ``paligemma-xray VERB …``.

Thin by design: each verb parses its flags here and calls one library function. Flags are
documented where they are declared, so ``--help`` on any verb explains it. User mistakes
arrive as :class:`~paligemma_xray.errors.PaligemmaXrayError` and are printed without a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from paligemma_xray import __version__
from paligemma_xray.errors import PaligemmaXrayError

Handler = Callable[[argparse.Namespace], int]


def _verb(subparsers, name: str, handler: Handler, help: str, description: str | None = None):
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


# ---------------------------------------------------------------------------------------------
# data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
_VERBS: list[Callable] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PaligemmaXrayError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
