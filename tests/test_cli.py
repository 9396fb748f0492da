"""The command line: every verb (and sub-verb) answers --help without loading anything heavy."""

from __future__ import annotations

import argparse

import pytest

from paligemma_xray.cli import build_parser, main


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:  # argparse has no public way to list sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found.extend(_verbs(sub, (*prefix, name)))
    return found


VERBS = _verbs(build_parser())


def test_every_verb_is_listed() -> None:
    top = {v[0] for v in VERBS}
    assert {"data", "convert", "train", "predict", "evaluate", "report", "serve", "demo"} <= top
    assert ("data", "check") in VERBS


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help_of_each_verb(verb, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"usage: paligemma-xray {' '.join(verb)}") and len(out.splitlines()) > 3
