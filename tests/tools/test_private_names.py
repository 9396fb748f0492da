"""The "no private names across modules" contract (tools/private_names.py, run by lint-imports)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = {
    "pkg",
    "pkg.a",
    "pkg.b",
    "pkg.sub",
    "pkg.sub.c",
    "pkg.sub._hidden",
}


@pytest.fixture(scope="module")
def contract():
    spec = importlib.util.spec_from_file_location("private_names", ROOT / "tools" / "private_names.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["private_names"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["private_names"]


def found(contract, source: str, module: str = "pkg.b", *, is_package: bool = False) -> list[str]:
    return [
        f"{v.line}:{v.owner}.{v.name}"
        for v in contract.violations_in(source, module, MODULES, path=Path("x.py"), is_package=is_package)
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from pkg.a import _helper\n", ["1:pkg.a._helper"]),
        ("from pkg.a import public, _helper as h\n", ["1:pkg.a._helper"]),
        ("def f():\n    from pkg.a import _helper\n", ["2:pkg.a._helper"]),  # lazy imports count
        ("from .a import _helper\n", ["1:pkg.a._helper"]),
        ("from .sub.c import _helper\n", ["1:pkg.sub.c._helper"]),
        ("from pkg import a\n\ndef f():\n    return a._helper()\n", ["4:pkg.a._helper"]),
        ("def f():\n    from pkg import a\n    return a._CONSTANT\n", ["3:pkg.a._CONSTANT"]),
        ("import pkg.a as m\nm._helper\n", ["2:pkg.a._helper"]),
        ("import pkg.sub.c\npkg.sub.c._helper\n", ["2:pkg.sub.c._helper"]),
        ("from pkg import sub\nsub.c._helper\n", ["2:pkg.sub.c._helper"]),
        ("from pkg.sub._hidden import thing\n", []),  # a private module is import-linter's own contract
        ("from pkg.sub import _hidden\n", ["1:pkg.sub._hidden"]),  # outside its parent package
        ("from pkg.a import Thing\nThing._cache\n", ["2:pkg.a.Thing._cache"]),
        ("from pkg import a\na.Thing._cache.clear()\n", ["2:pkg.a.Thing._cache"]),
        ("from .a import Thing as T\ndef f():\n    return T._build()\n", ["3:pkg.a.Thing._build"]),
    ],
)
def test_uses_of_another_modules_private_names_are_found(contract, source, expected):
    assert found(contract, source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "from pkg.b import _helper\n",  # its own name
        "from pkg.a import helper, CONSTANT\n",
        "from pkg import a\na.__name__, a.__file__\n",  # dunders are not private
        "class C:\n    def f(self):\n        return self._state\n",
        "import numpy as np\nnp._NoValue\n",  # not a module of the package
        "from pkg.a import Thing\nThing()._cache\n",
        "def f(a):\n    return a._x\n",  # a parameter named like a module
        "from pkg.a import Point\nPoint._make((1, 2))._asdict()\n",  # namedtuple's API
        "from pkg.b import Thing\nThing._cache\n",  # its own class
    ],
)
def test_own_public_and_foreign_names_are_allowed(contract, source):
    assert found(contract, source) == []


def test_a_private_submodule_may_be_used_inside_its_parent_package(contract):
    assert found(contract, "from pkg.sub import _hidden\n", "pkg.sub.c") == []
    assert found(contract, "from . import _hidden\n", "pkg.sub.c") == []
    assert found(contract, "from . import _hidden\n", "pkg.sub", is_package=True) == []


def test_the_package_keeps_the_contract(contract):
    """What `lint-imports` checks in `make lint`, so that the suite fails on a violation too."""
    src = ROOT / "src"
    modules = {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for p in (src / "paligemma_xray").rglob("*.py")
    }
    violations = []
    for module in sorted(modules):
        path, is_package = contract.module_path(module)
        found = contract.violations_in(
            path.read_text(encoding="utf-8"), module, modules, path=path, is_package=is_package
        )
        violations += [str(v) for v in found]
    assert violations == []
