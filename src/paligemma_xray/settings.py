"""Typed settings: one pydantic dataclass per verb gives its YAML file, flags, help and checks.

A verb's settings are declared once, as a pydantic dataclass (``Settings`` below is the
common configuration): each field has a type (``Literal[...]`` for choices, an annotated
bound for numbers), a default and a docstring. From that one declaration come

* the ``--config FILE`` YAML keys (:func:`read_yaml`: unknown keys, duplicates and syntax
  errors are one ``file:line`` line),
* the command-line flags (:func:`add_flags`: ``--field-name``, help from the docstring,
  choices from the ``Literal``), with a :class:`Flag` marker where a flag is spelled
  otherwise (``--iou`` for ``iou_threshold``), repeats (``--model A --model B``), is
  positional or must be given,
* the checks (pydantic on construction and assignment, plus the class's own
  ``model_validator``), raised as one :class:`~paligemma_xray.errors.ConfigError` line by
  :func:`build`.

Values resolve as: the field defaults ← the ``--config`` file ← the flags the user typed
(:func:`from_args`). Library callers build the same objects directly
(``PredictSettings(model=["runs/r1"], paths=["xrays/"])``) and get the same checks.
``train``'s :class:`~paligemma_xray.train.recipes.TrainConfig` uses this module too, with
its presets in front.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError

from paligemma_xray.errors import ConfigError

# The pydantic configuration of every settings class: unknown fields refused, types strict
# (a YAML "8" is not the integer 8), checked again on assignment, docstrings as help.
SETTINGS_CONFIG = ConfigDict(
    extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True
)


def _no_bool(value: Any) -> Any:
    # YAML's true/false would pass as 1.0/0.0 in pydantic's lax float mode.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


def _as_list(value: Any) -> Any:
    # ``model: runs/r1`` in a YAML file means the one-element list.
    return [value] if isinstance(value, str) else value


# YAML 1.1 reads ``1e-3`` as a string: numbers are accepted from strings (lax), never from booleans.
Float = Annotated[float, BeforeValidator(_no_bool), Field(strict=False, allow_inf_nan=False)]
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Probability = Annotated[Float, Field(ge=0, le=1)]
StrList = Annotated[list[str], BeforeValidator(_as_list)]
"""A list of strings; a single string (``model: runs/r1`` in YAML) is a list of one."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line (``Annotated[type, Flag(...)]``).

    Without one a field ``batch_size`` is ``--batch-size``; a boolean is ``--x`` when it
    defaults to False and ``--no-x`` when it defaults to True.
    """

    names: tuple[str, ...] = ()
    """Flag names instead of ``--field-name`` (``("--iou",)``; aliases after the first)."""
    metavar: str | None = None
    """Placeholder in the help (default: the field name in capitals)."""
    positional: bool = False
    """A positional argument (a list field takes any number)."""
    append: bool = False
    """A list field given by repeating the flag (``--model A --model B``)."""
    required: bool = False
    """Must be given, by a flag or in the ``--config`` file (argparse's one-line error)."""
    show_default: bool = True
    """Append ``(default: X)`` to the help; off where the docstring says what the default means."""


def flag(*names: str, **options: Any) -> Flag:
    """``Flag(names, **options)``: ``Annotated[int, flag("--iou")]``."""
    return Flag(names=names, **options)


Settings = TypeVar("Settings")


def fields(cls: type) -> dict[str, Any]:
    """The pydantic field infos of a settings class, in declaration order."""
    return dict(cls.__pydantic_fields__)  # type: ignore[attr-defined]


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (pydantic reads it into the field's description), by name.

    A field inherited from a base class keeps the base's docstring (pydantic reads only the
    docstrings written in the class itself).
    """
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        for name, info in getattr(klass, "__pydantic_fields__", {}).items():
            if not docs.get(name):
                docs[name] = " ".join((info.description or "").split())
    return {name: docs.get(name, "") for name in fields(cls)}


def flag_of(info: Any) -> Flag:
    """The :class:`Flag` marker of a field (a default one if it has none)."""
    return next((m for m in info.metadata if isinstance(m, Flag)), Flag())


def flag_names(name: str, info: Any) -> tuple[str, ...]:
    """The command-line spelling of field ``name`` (its first name is the one errors use)."""
    marker = flag_of(info)
    if marker.positional:
        return (marker.metavar or name.upper(),)
    if marker.names:
        return marker.names
    if _flag_type(info.annotation)[0] is bool and _default(info) is True:
        return ("--no-" + name.replace("_", "-"),)
    return ("--" + name.replace("_", "-"),)


def _default(info: Any) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def build(
    cls: type[Settings],
    values: dict[str, Any],
    *,
    file: str | Path | None = None,
    lines: dict[str, tuple[Path, int | None]] | None = None,
    names: dict[str, str] | None = None,
) -> Settings:
    """``cls(**values)``, a mistake raised as one :class:`ConfigError` line.

    The message names the field (``names``: its flag, where the value came from one), what it
    accepts and what it got; for a value read from a YAML file (``lines``: field → (file,
    line)) it starts with ``file:line``; ``file`` names the file for mistakes that involve
    several fields. A ConfigError a class's validator raises keeps its words; when values came
    from a file it gains the file (and the line of the field it names).
    """
    lines = lines or {}
    names = names or {}
    known = fields(cls)
    unknown = sorted(set(values) - set(known))
    # Unknown keys are reported together with the known fields' mistakes: one round trip, not two.
    problems: list[str] = []
    path: str | Path | None = file
    line: int | None = None
    if unknown:
        hints = [difflib.get_close_matches(name, known, n=1) for name in unknown]
        named = ", ".join(f"{u} (did you mean {h[0]}?)" if h else u for u, h in zip(unknown, hints))
        path, line = lines.get(unknown[0], (file, None))
        problems.append(f"unknown config field(s): {named}")
    try:
        settings = cls(**{k: v for k, v in values.items() if k in known})
    except ConfigError as error:  # a class's own check (several fields, or a library check's words)
        if problems:
            raise ConfigError("; ".join([*problems, error.message]), path=path, line=line) from None
        if error.path is not None or file is None:
            raise
        # A value from the file: name the line of the first field the message speaks of.
        said = [k for k in lines if k in error.message or k.replace("_", " ") in error.message]
        path, line = lines[said[0]] if said else (Path(file), None)
        raise ConfigError(error.message, path=path, line=line) from None
    except ValidationError as error:
        for item in error.errors():
            name = str(item["loc"][0]) if item["loc"] else None
            message = item["msg"].removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
            if name is None:
                problems.append(message)
                continue
            problems.append(f"{names.get(name, name)}: {message}, got {item['input']!r}")
            if path is file and name in lines:
                path, line = lines[name]
        raise ConfigError("; ".join(problems), path=path, line=line) from None
    if problems:
        raise ConfigError("; ".join(problems), path=path, line=line)
    return settings


def to_dict(settings: Any) -> dict[str, Any]:
    """A settings object as a plain dict (YAML-ready), fields in declaration order."""
    return dataclasses.asdict(settings)


def to_yaml(settings: Any) -> str:
    """YAML text with every field, in declaration order (what ``--config`` reads back)."""
    return yaml.safe_dump(to_dict(settings), sort_keys=False)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[Path, int | None]]]:
    """A settings YAML file as ``(field values, field → (file, line))``.

    Mistakes in the file itself are one :class:`ConfigError` line with ``file:line``: not
    found, YAML syntax, a key given twice, not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError("config file not found", path=path) from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _DuplicateKey as error:
        raise ConfigError(f"{error.key!r} is given twice", path=path, line=error.line) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" (column {mark.column + 1})" if mark is not None else ""
        problem = error.problem or error.context or "syntax error"
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"not valid YAML: {problem}{where}", path=path, line=line) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {' '.join(str(error).split())}", path=path) from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError("a settings file holds a mapping of field: value", path=path)
    lines: dict[str, tuple[Path, int | None]] = {
        str(k.value): (path, k.start_mark.line + 1) for k, _ in node.value
    }
    return data, lines


# ---------------------------------------------------------------------------------------------
# command-line flags, one per field, documented by the field's own docstring


def _flag_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None, bool]:
    """``(type, choices, is_list)`` of an argparse flag for a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return str, tuple(typing.get_args(annotation)), False
    if origin in (typing.Union, types.UnionType):
        return _flag_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin is list:
        kind, choices, _ = _flag_type(typing.get_args(annotation)[0])
        return kind, choices, True
    return annotation, None, False


def _shown(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != ""


def add_flags(
    parser: Any,
    cls: type,
    *,
    exclude: typing.Collection[str] = (),
    title: str | None = None,
    default_label: str | None = None,
    negatable: bool = False,
) -> None:
    """Add one argument per field of ``cls`` to an argparse parser (``dest`` = the field name).

    Every flag defaults to ``None`` = "not given", so that only what the user typed overrides
    the ``--config`` file (and, for ``train``, the preset). Help comes from the docstring,
    followed by ``(default: X)`` (``default_label``: ``"big-vision"`` gives ``[big-vision: X]``
    instead, after every field); choices from a ``Literal``. Booleans: ``--x`` / ``--no-x``
    both with ``negatable``, else the one that changes the default. ``title``: an argument
    group of that title.
    """
    docs = field_docs(cls)
    target = parser.add_argument_group(title) if title else parser
    for name, info in fields(cls).items():
        if name in exclude:
            continue
        marker = flag_of(info)
        default = _default(info)
        text = docs.get(name, "")
        if default_label is not None:
            text = f"{text} [{default_label}: {default}]"
        elif marker.show_default and _shown(default) and not (isinstance(default, bool)):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text = f"{text.rstrip('.')} (default: {shown})"
        kind, choices, is_list = _flag_type(info.annotation)
        names = flag_names(name, info)
        if not marker.positional and names[0].lstrip("-").replace("-", "_") != name:
            text = f"{text} [config: {name}]"  # the YAML key, where the flag is spelled otherwise
        text = text.replace("%", "%%")
        metavar = marker.metavar or ("{" + ",".join(choices) + "}" if choices else name.upper())
        if marker.positional:
            target.add_argument(
                name, nargs="*" if is_list else "?", type=kind, default=None, metavar=metavar, help=text
            )
        elif kind is bool and negatable:
            target.add_argument(
                *names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif kind is bool:
            target.add_argument(
                *names, dest=name, action="store_const", const=not default, default=None, help=text
            )
        elif is_list and marker.append:
            target.add_argument(
                *names, dest=name, action="append", type=kind, choices=choices, default=None,
                metavar=metavar, help=text,
            )  # fmt: skip
        elif is_list:
            target.add_argument(
                *names, dest=name, nargs="+", type=kind, default=None, metavar=metavar, help=text
            )
        else:
            target.add_argument(
                *names, dest=name, type=kind, choices=choices, default=None, metavar=metavar, help=text
            )


def given(args: argparse.Namespace, cls: type, exclude: typing.Collection[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` an argparse namespace sets (``None`` = not given, dropped)."""
    values = {name: getattr(args, name, None) for name in fields(cls) if name not in exclude}
    return {k: v for k, v in values.items() if v is not None}


def from_args(
    cls: type[Settings],
    args: argparse.Namespace,
    *,
    config_file: str | Path | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> Settings:
    """The settings a verb runs with: defaults ← ``config_file`` (YAML) ← the flags given.

    A required field (``Flag(required=True)``) found in neither is argparse's one-line
    "the following arguments are required" (``parser.error``, exit 2), as if argparse had
    checked it; a bad value is a :class:`ConfigError` naming the flag, or the file and line.
    """
    values, lines = read_yaml(config_file) if config_file is not None else ({}, {})
    flags = given(args, cls)
    for key in flags:  # a flag overrides the file: its mistakes are the flag's
        lines.pop(key, None)
    values.update(flags)
    infos = fields(cls)
    missing = [
        flag_names(name, info)[0]
        for name, info in infos.items()
        if flag_of(info).required and not values.get(name)
    ]
    if missing:
        message = f"the following arguments are required: {', '.join(missing)}"
        if parser is not None:
            parser.error(message)
        raise ConfigError(message, path=config_file)
    names = {name: flag_names(name, info)[0] for name, info in infos.items() if name in flags}
    return build(cls, values, file=config_file, lines=lines, names=names)
