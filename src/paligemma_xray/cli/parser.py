"""The parser, the verb list and :func:`main`: what every verb shares.

A verb module calls :func:`verb` with its handler, its help, its examples (the end of its
``--help``) and, for a verb with typed settings, the settings class: its fields become the
flags and ``--config FILE`` reads them from YAML; :func:`main` then builds the settings
object (defaults ← file ← flags, checked) and hands it to the handler. User mistakes arrive
as :class:`~paligemma_xray.errors.PaligemmaXrayError` and are printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from paligemma_xray import __version__
from paligemma_xray.errors import PaligemmaXrayError

Handler = Callable[[Any], int]


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a pointer to ``--help``.

    argparse prints the whole usage (dozens of lines for ``train``) before the error; the
    line that says what is wrong then scrolls away.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        # Flag help taken from docstrings carries reST (``x``, :func:`y`); a terminal shows it raw.
        text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", super().format_help())
        return re.sub(r"``([^`]*)``", r"\1", text)


def verb(
    subparsers: Any,
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str | None = None,
    examples: Sequence[str] = (),
    settings: type | None = None,
) -> argparse.ArgumentParser:
    """Add the verb ``name``: its help, examples, ``--no-progress`` and handler.

    With ``settings`` (a settings class, :mod:`paligemma_xray.settings`), one flag per field
    and ``--config FILE`` are added, and the handler receives the settings object; without,
    it receives the argparse namespace.
    """
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # a verb may declare its own --no-progress (train's recipe field)
    )
    if examples:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (without a terminal they are plain lines every 30 s)",
    )
    if settings is not None:
        from paligemma_xray.settings import add_flags

        parser.add_argument(
            "--config",
            metavar="FILE",
            help="YAML file of this verb's settings, field: value (a field is its flag's name\n"
            "with _, or the [config: key] shown); flags given override it",
        )
        add_flags(parser, settings)
    parser.set_defaults(handler=handler, settings_class=settings, verb_parser=parser)
    return parser


def say(message: str) -> None:
    """A line for the user on stderr (results that are data go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every verb of :data:`VERBS`."""
    parser = Parser(
        prog="paligemma-xray",
        description="Fine-tune, evaluate and serve PaliGemma bone-fracture detectors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(title="verbs", metavar="VERB")
    verbs.required = True
    for name in VERBS:
        importlib.import_module(f"paligemma_xray.cli.{name}").register(verbs)
    return parser


# The verbs, in the order --help lists them: each is a module of this package whose
# ``register(verbs)`` adds it (with its own sub-verbs where it has them).
VERBS = ("data", "convert", "train", "predict", "evaluate", "report", "serve", "demo", "pacs")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; the exit code (0 done, 1 problems found, 2 a user mistake, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from paligemma_xray import progress

    shown = progress.is_enabled()
    progress.set_enabled(shown and not getattr(args, "no_progress", False))
    try:
        given: Any = args
        if args.settings_class is not None:
            from paligemma_xray.settings import from_args

            given = from_args(args.settings_class, args, config_file=args.config, parser=args.verb_parser)
        return int(args.handler(given) or 0)
    except PaligemmaXrayError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        progress.set_enabled(shown)  # main() called in-process (tests, notebooks) leaves it as it was
