"""An import-linter contract: no module uses another module's private names.

A name is private when it starts with one underscore (``_helper``; dunders such as
``__version__`` are not private). A module of the package may use its own private names
only: ``from paligemma_xray.x import _helper``, ``from .x import _helper``, ``x._helper``
(``x`` bound to another module of the package, at module or function level) and
``Thing._helper`` (``Thing`` imported from another module) are violations. Attributes of
instances (``self._x``, ``detector._model``) are not seen: that needs types, not syntax.
A name two modules legitimately share is public; make it so.

import-linter's graph holds modules, not names, so the check reads each module's source
(``ast``) itself. Registered in pyproject.toml ``[tool.importlinter]``::

    contract_types = ["private_names: tools.private_names.PrivateNamesContract"]

``lint-imports`` puts the working directory on ``sys.path``, which makes ``tools`` importable.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grimp
from importlinter import Contract, ContractCheck, fields, output


@dataclass(frozen=True)
class Violation:
    """``module`` (file ``path``, ``line``) uses ``name``, private to ``owner``."""

    module: str
    path: Path
    line: int
    owner: str
    name: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.module} uses {self.owner}.{self.name}, private to {self.owner}"
        )


# Public API spelled with an underscore (namedtuple's methods), allowed on another module's classes.
_PUBLIC_UNDERSCORED = frozenset({"_asdict", "_fields", "_field_defaults", "_make", "_replace"})


def is_private(name: str) -> bool:
    """``_x`` is private; ``__x__`` (dunder) and ``x`` are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from {'.' * level}{target} import ...`` written in ``module``."""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    names.append(node.id)
    return names[::-1]


def violations_in(
    source: str, module: str, modules: set[str], *, path: Path, is_package: bool = False
) -> Iterator[Violation]:
    """Each use, in ``source`` (module ``module``), of a private name of another of ``modules``."""
    tree = ast.parse(source, filename=str(path))
    # What each name bound by an import of the package stands for, as a dotted path: a module
    # (``from pkg import a``) or something in one (``from pkg.a import Thing``). At any level:
    # lazy imports count too.
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname is not None and alias.name in modules:
                    bound[alias.asname] = alias.name
                elif alias.asname is None:
                    top = alias.name.split(".")[0]
                    if top in modules:
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            owner = (
                _resolve_relative(module, is_package, node.level, node.module)
                if node.level
                else node.module or ""
            )
            if owner not in modules:
                continue
            for alias in node.names:
                full = f"{owner}.{alias.name}"
                # A private submodule may be imported inside its parent package.
                inside = full in modules and module.startswith(owner + ".")
                if is_private(alias.name) and owner != module and not inside:
                    yield Violation(module, path, node.lineno, owner, alias.name)
                if alias.name != "*":
                    bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        chain = _dotted(node.value)
        if chain is None or chain[0] not in bound:
            continue
        target = [*bound[chain[0]].split("."), *chain[1:]]
        # The module that holds it: the longest prefix of the path that is a module.
        cut = max(k for k in range(1, len(target) + 1) if ".".join(target[:k]) in modules)
        owner, inner = ".".join(target[:cut]), target[cut:]
        if owner == module:
            continue
        if inner:  # an attribute of a class, function or object of another module
            if node.attr not in _PUBLIC_UNDERSCORED:
                yield Violation(module, path, node.lineno, owner, ".".join([*inner, node.attr]))
        elif not (f"{owner}.{node.attr}" in modules and module.startswith(owner + ".")):
            # (a private submodule may be used inside its parent package)
            yield Violation(module, path, node.lineno, owner, node.attr)


def module_path(module: str) -> tuple[Path, bool]:
    """The source file of ``module`` and whether it is a package (nothing is imported)."""
    root, *rest = module.split(".")
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{root} is not an importable package")
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    return base.with_suffix(".py"), False


class PrivateNamesContract(Contract):
    """No module of ``containers`` uses a private name of another module (see the module doc).

    Configuration options:

        - containers: the packages whose modules are checked, and whose names count as the
          package's (e.g. ``paligemma_xray``).
    """

    type_name = "private_names"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        # import-linter sets each field's parsed value on the instance; the class attribute
        # (what the checker sees) is the Field itself.
        containers = [str(c) for c in self.containers]  # type: ignore[attr-defined]
        modules = {m for m in graph.modules if any(m == c or m.startswith(c + ".") for c in containers)}
        found: list[Violation] = []
        here = Path.cwd()
        for module in sorted(modules):
            path, is_package = module_path(module)
            if path.is_relative_to(here):
                path = path.relative_to(here)  # file:line as the other linters print it
            output.verbose_print(verbose, f"Reading {path}...")
            found.extend(violations_in(path.read_text(), module, modules, path=path, is_package=is_package))
        return ContractCheck(kept=not found, metadata={"violations": [str(v) for v in found]})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(line)
        output.new_line()
        output.print("Make the name public where two modules share it, or keep the use in its module.")
