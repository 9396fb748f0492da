"""Find and read a data set on disk, whatever layout it comes in.

Layouts (detected in this order):

* ``roboflow`` — the Roboflow "paligemma" export: ``root/dataset/_annotations.<split>.jsonl``
  with every image in ``root/dataset/``; pointing at the ``dataset/`` folder itself works too.
* ``maestro`` — ``root/<split>/annotations.jsonl`` with the images beside each file.
* ``jsonl`` — a plain JSONL file (its split taken from its name, else ``train``), or a
  folder of ``<split>.jsonl`` files; images relative to the JSONL file's folder, or in an
  ``images/`` folder beside it, or in ``image_dir``.

Each line is ``{"image": …, "prefix": …, "suffix": …}``. Lines that cannot be used become
``error`` problems (with file and line) and are left out of the splits; usable but
suspicious ones stay, with a ``warning``. An image outside the data set's folder (``../..``,
an absolute path, a symlink pointing out; ``image_dir`` counts as inside) is such an error
(``outside_image``) unless ``allow_outside_images=True``: a set from elsewhere must not make
the tool read, train on and embed in HTML any file it names.

Example:
    >>> import tempfile
    >>> from paligemma_xray.data.synth import generate
    >>> root = generate(tempfile.mkdtemp(), n=5, seed=0, size=64, progress=False)
    >>> ds = open_dataset(root)
    >>> ds.layout, len(ds), ds.problems
    ('roboflow', 5, [])
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from paligemma_xray.data.records import (
    SPLITS,
    Dataset,
    Problem,
    Record,
    normalise_split,
    suffix_issues,
)
from paligemma_xray.errors import DataError
from paligemma_xray.locations import classes_from_prefix

_ROBOFLOW_FILE = re.compile(r"^_annotations\.(?P<split>[^.]+)\.jsonl$")


def _split_order(name: str) -> tuple[int, str]:
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def _roboflow_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("_annotations.*.jsonl")):
        match = _ROBOFLOW_FILE.match(path.name)
        if match and path.is_file():
            found.setdefault(normalise_split(match.group("split")), path)
    return found


def _maestro_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        candidate = sub / "annotations.jsonl"
        if candidate.is_file():
            found.setdefault(normalise_split(sub.name), candidate)
    return found


def _split_from_name(path: Path) -> str:
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    for token in reversed(re.split(r"[._\-\s]+", stem.lower())):
        key = normalise_split(token)
        if key in SPLITS:
            return key
    return "train"


def _plain_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.jsonl")):
        key = normalise_split(path.stem)
        if key in SPLITS and path.is_file():
            found.setdefault(key, path)
    return found


def open_dataset(
    root: str | Path, *, image_dir: str | Path | None = None, allow_outside_images: bool = False
) -> Dataset:
    """Open the data set at ``root``, detecting its layout (see the module docstring).

    Args:
        root: data set folder (or its ``dataset/`` folder), or a single ``.jsonl`` file.
        image_dir: where the images are, for a plain JSONL whose image paths are relative
            to some other folder.
        allow_outside_images: accept records whose image lies outside ``root`` (and
            ``image_dir``); by default they are ``outside_image`` errors, left out.

    Raises:
        DataError: naming ``root`` when it does not exist or no layout matches.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError("no such file or folder", path=root)
    try:
        extra = Path(image_dir).expanduser().resolve() if image_dir is not None else None
        home = (root.parent if root.is_file() else root).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
        raise DataError(f"cannot resolve the path: {error}", path=root) from None
    inside = None if allow_outside_images else [home, *([extra] if extra is not None else [])]
    if root.is_file():
        if not root.name.endswith(".jsonl"):
            raise DataError("not a data set: expected a folder or a .jsonl annotation file", path=root)
        files = {_split_from_name(root): root}
        return _read(root, "jsonl", files, lambda f: _plain_bases(f, extra), inside)

    folder = root / "dataset"
    if folder.is_dir() and (files := _roboflow_files(folder)):
        return _read(root, "roboflow", files, lambda f: [f.parent], inside)
    if files := _roboflow_files(root):
        return _read(root, "roboflow", files, lambda f: [f.parent], inside)
    if files := _maestro_files(root):
        return _read(root, "maestro", files, lambda f: [f.parent], inside)
    if files := _plain_files(root):
        return _read(root, "jsonl", files, lambda f: _plain_bases(f, extra), inside)
    raise DataError(
        "no data set found: expected dataset/_annotations.<split>.jsonl (Roboflow 'paligemma'"
        " export), <split>/annotations.jsonl (maestro) or <split>.jsonl files",
        path=root,
    )


def _plain_bases(jsonl: Path, extra: Path | None) -> list[Path]:
    bases = [extra] if extra is not None else []
    return [*bases, jsonl.parent, jsonl.parent / "images"]


def _resolve_image(name: str, bases: list[Path]) -> Path:
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate
    for base in bases:
        path = (base / candidate).resolve()
        if path.is_file():
            return path
    return (bases[0] / candidate).resolve()


def _read(root: Path, layout: str, files: dict[str, Path], bases_for, inside: list[Path] | None) -> Dataset:
    splits: dict[str, list[Record]] = {}
    problems: list[Problem] = []
    for split in sorted(files, key=_split_order):
        source = files[split].resolve()
        records, found = read_jsonl(source, split, bases_for(source), inside)
        splits[split] = records
        problems.extend(found)
    return Dataset(root=root.resolve(), layout=layout, splits=splits, problems=problems)


def read_jsonl(
    source: Path, split: str, bases: list[Path], inside: list[Path] | None = None
) -> tuple[list[Record], list[Problem]]:
    """Read one annotation file: its usable records and the problems of its lines.

    Image paths are resolved against the first of ``bases`` holding the file. ``inside``:
    the folders images must lie in once symlinks are followed (``None``: anywhere).
    """
    records: list[Record] = []
    problems: list[Problem] = []

    def problem(kind: str, message: str, line: int | None, severity: str = "error") -> None:
        problems.append(
            Problem(kind=kind, message=message, path=source, line=line, severity=severity, split=split)
        )

    try:
        raw = source.read_bytes()
    except OSError as error:
        problem("unreadable_file", f"cannot read annotation file: {error.strerror or error}", None)
        return records, problems
    seen: dict[str, int] = {}
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, data in enumerate(lines, start=1):
        try:
            text = data.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as error:
            problem("bad_json", f"line is not UTF-8 text ({error.reason} at byte {error.start})", number)
            continue
        if not text:
            continue  # blank lines carry no record (an editor's trailing newline)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as error:
            problem("bad_json", f"invalid JSON: {error.msg} (column {error.colno})", number)
            continue
        if not isinstance(obj, dict):
            problem("bad_record", f"expected a JSON object, got {type(obj).__name__}", number)
            continue
        missing = [key for key in ("image", "prefix", "suffix") if key not in obj]
        if missing:
            problem("missing_key", f"missing key(s) {', '.join(missing)}; record skipped", number)
            continue
        wrong = [key for key in ("image", "prefix", "suffix") if not isinstance(obj[key], str)]
        if wrong:
            kinds = ", ".join(f"{k} is {type(obj[k]).__name__}" for k in wrong)
            problem(
                "bad_value", f"image, prefix and suffix must be strings ({kinds}); record skipped", number
            )
            continue
        name, prefix, suffix = obj["image"].strip(), obj["prefix"], obj["suffix"]
        if not name:
            problem("bad_value", "empty image name; record skipped", number)
            continue
        try:
            image = _resolve_image(name, bases).resolve()
            found_file = image.is_file()
        except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
            problem("missing_image", f"image {name!r} cannot be resolved ({error}); record skipped", number)
            continue
        if not found_file:
            problem("missing_image", f"image {name!r} not found (looked for {image}); record skipped", number)
            continue
        if inside is not None and not any(image.is_relative_to(folder) for folder in inside):
            problem(
                "outside_image",
                f"image {name!r} is outside the data set's folder ({image}); record skipped "
                "(--allow-outside-images to use it)",
                number,
            )
            continue
        classes = classes_from_prefix(prefix)
        if not classes:
            problem(
                "no_classes",
                f"prefix {prefix!r} is not a 'detect a ; b' prompt: no class list",
                number,
                "warning",
            )
        fatal = False
        for issue in suffix_issues(suffix, classes):
            note = "; record skipped" if issue.severity == "error" else ""
            problem(issue.kind, issue.message + note, number, issue.severity)
            fatal |= issue.severity == "error"
        if fatal:
            continue
        key = str(image)
        if key in seen:
            problem(
                "duplicate_record", f"image {name!r} already listed on line {seen[key]}", number, "warning"
            )
        seen.setdefault(key, number)
        records.append(
            Record(image=image, prefix=prefix, suffix=suffix, split=split, source=source, line=number)
        )
    if not records and not problems:
        problem("empty_split", f"no records in split {split!r}", None, "warning")
    return records, problems
