"""The runnable examples in public docstrings stay runnable."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import paligemma_xray


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(paligemma_xray.__path__, "paligemma_xray."):
        # The demo's examples train models: its end-to-end test covers them instead.
        if info.name.startswith("paligemma_xray.demo") or info.name == "paligemma_xray.cli":
            continue
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and ">>>" in Path(spec.origin).read_text(encoding="utf-8"):
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} shows '>>>' but no example ran"  # e.g. one doctest cannot find
    assert result.failed == 0


def test_no_example_is_only_a_comment():
    """``>>> # f(x)`` passes as a doctest and tests nothing: write it as a literal block instead."""
    root = Path(paligemma_xray.__file__).parent
    commented = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip().startswith(">>> #")
    ]
    assert commented == []
