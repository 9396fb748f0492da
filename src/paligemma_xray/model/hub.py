"""Models by name: Hugging Face Hub ids and Kaggle handles, resolved to local files.

Users of this field name models the way the model cards do: ``google/paligemma2-3b-pt-224``
(a Hugging Face Hub repo: transformers weights, or a PEFT LoRA adapter whose base is
another id), or ``kaggle:google/paligemma/jax/paligemma-3b-pt-224`` (big_vision's ``.npz``
on Kaggle, as the original colab takes it). :func:`resolve_model` turns either into a
local path that :func:`paligemma_xray.model.load` reads, through each library's own
machinery and cache, so that downloads, credentials and offline use behave as users know
them:

* Hub: ``huggingface_hub.snapshot_download`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
  ``HF_TOKEN`` (or ``hf auth login``) for gated repos — read by the library, never printed
  or saved by us —, ``HF_HUB_OFFLINE=1`` for no network at all; a cached snapshot is used
  when the Hub cannot be reached. Only what :func:`~paligemma_xray.model.load` reads is
  fetched (JSON configs, safetensors, the SentencePiece model), and ``config.json`` first,
  so that a repo that is not PaliGemma is refused before its weights are downloaded.
  A repo of big_vision weights (``google/paligemma-3b-pt-224-jax``) gives its ``.npz``, chosen
  as for Kaggle, and the SentencePiece model beside it.
* Kaggle: ``kagglehub.model_download`` (the optional ``kaggle`` extra) into its cache
  (``KAGGLEHUB_CACHE``), credentials from ``KAGGLE_USERNAME``/``KAGGLE_KEY`` or
  ``~/.kaggle/kaggle.json``; the newest cached version when Kaggle cannot be reached. The
  variation's ``.npz`` is chosen (16-bit first, as the colab does, or the one matching
  ``dtype``), with ``paligemma_tokenizer.model`` from the same download.

A local path that exists always wins over a name of the same spelling. Every failure (gated
repo, no such repo or revision, no network and nothing cached, not a PaliGemma repo) is one
:class:`~paligemma_xray.errors.CheckpointError` line; neither library retries a connection
that fails (no network: a second or two; a network that drops packets: huggingface_hub's
``HF_HUB_ETAG_TIMEOUT``, 10 s), and a cached commit is used without asking, so there is no
retry storm.

>>> is_model_name("google/paligemma-3b-mix-224"), is_model_name("kaggle:google/paligemma/jax/pg-3b-pt-224")
(True, True)
>>> is_model_name("runs/r1.npz"), is_model_name("/models/pg2"), is_model_name("runs/r1/best")
(False, False, False)

``model.load("google/paligemma2-3b-pt-224", revision="main")`` goes through :func:`resolve_model`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import snapshot_download
from huggingface_hub.file_download import repo_folder_name

from paligemma_xray.errors import CheckpointError
from paligemma_xray.model.forms import (
    ADAPTER_CONFIG,
    CONFIG,
    KAGGLE_PREFIX,
    TOKENIZER_NAMES,
    is_model_name,
)

logger = logging.getLogger(__name__)
PurePathT = TypeVar("PurePathT", bound=PurePath)

# What model.load reads from a Hub repo: configs, safetensors weights, the SentencePiece
# model; a PEFT adapter's weights also come as adapter_model.bin from older peft versions.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "adapter_model.bin"]
HUB_HEAD_FILES = [CONFIG, ADAPTER_CONFIG]
# Precision tags in big_vision file names (paligemma-3b-pt-224.f16.npz, paligemma2-…b16.npz).
_NPZ_TAGS = {"float16": ("f16",), "bfloat16": ("bf16", "b16"), "float32": ("f32", "")}
_NPZ_PREFERENCE = ("f16", "bf16", "b16", "", "f32")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_model(ref: str | Path, revision: str | None = None, *, progress: bool = True) -> Path:
    """The local checkpoint path for ``ref``: a path, a Hub id or a ``kaggle:`` handle.

    ``revision``: a Hub branch, tag or commit hash (default ``main``), or a Kaggle version
    number. An existing local path is returned as it is (``revision`` then does not apply).
    A string that is neither an existing path nor a model name comes back as a ``Path``, so
    that :func:`~paligemma_xray.model.load` reports it as a missing checkpoint.
    """
    return resolve_checkpoint(ref, revision, progress=progress)[0]


def resolve_checkpoint(
    ref: str | Path,
    revision: str | None = None,
    *,
    dtype: str | None = None,
    progress: bool = True,
) -> tuple[Path, Path | None]:
    """``(checkpoint path, tokenizer path or None)`` for ``ref``; see :func:`resolve_model`.

    The tokenizer is known for a Kaggle download (its ``paligemma_tokenizer.model``), whose
    ``.npz`` may sit in another folder of the download. ``dtype`` picks the Kaggle ``.npz``
    of that precision when the variation holds several.
    """
    path = Path(ref)
    if path.exists() or not is_model_name(ref):
        if revision is not None and path.exists():
            logger.warning("%s is a local path: --revision %s does not apply to it", path, revision)
        return path, None
    text = str(ref)
    if text.startswith(KAGGLE_PREFIX):
        return _from_kaggle(text.removeprefix(KAGGLE_PREFIX), revision, dtype, progress)
    return _from_hub(text, revision, dtype, progress)


def portable_ref(ref: str | Path) -> str:
    """How to name ``ref`` in a saved file: an existing path made absolute, a model name as is."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() or not is_model_name(ref) else str(ref)


def check_paligemma_folder(folder: Path, name: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``folder``'s ``config.json`` describes a PaliGemma model.

    Caught here, before any weights are read (or downloaded), instead of transformers
    loading another architecture into PaliGemma's classes with a warning.
    """
    config = folder / CONFIG
    where = name or folder
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"unreadable config.json: {error}", path=config) from error
    if model_type != "paligemma":
        raise CheckpointError(
            f"{where} is a {model_type!r} model, not PaliGemma (config.json model_type)",
            path=None if name else config,
        )


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    return (
        constants.HF_HUB_OFFLINE
        or _truthy(os.environ.get("HF_HUB_OFFLINE"))
        or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    )


def _hub_cache() -> Path:
    """The Hub cache folder as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME``/hub).

    huggingface_hub fixes its default when first imported; a process that sets ``HF_HOME``
    later (a notebook, a test) would otherwise read and fill another cache.
    """
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _from_hub(
    repo_id: str, revision: str | None, dtype: str | None, progress: bool
) -> tuple[Path, Path | None]:
    cache, offline = _hub_cache(), _hub_offline()
    with _hub_progress(progress), _hub_errors(repo_id, revision, cache, offline):
        # A commit never changes: one already in the cache is used without asking the Hub.
        commit = revision is not None and _COMMIT.fullmatch(revision) is not None
        head = _snapshot(repo_id, revision, HUB_HEAD_FILES, cache, offline, local_first=commit)
        if (head / CONFIG).is_file():
            check_paligemma_folder(head, repo_id)
        elif not (head / ADAPTER_CONFIG).is_file():
            # big_vision's weights on the Hub (google/paligemma-3b-pt-224-jax): one .npz of
            # the repo, and the SentencePiece model beside it.
            files = [PurePosixPath(f) for f in _hub_files(repo_id, head, cache) if f.endswith(".npz")]
            if not files:
                raise CheckpointError(
                    f"{repo_id} has no config.json (transformers weights), adapter_config.json (a PEFT "
                    "adapter) or big_vision .npz: not a PaliGemma checkpoint this tool reads"
                )
            npz = _choose_npz(files, repo_id.split("/")[1].removesuffix("-jax"), dtype).as_posix()
            patterns = [npz, *TOKENIZER_NAMES]
            folder = _snapshot(repo_id, head.name, patterns, cache, offline, local_first=True)
            return folder / npz, _find_tokenizer(folder)
        # The snapshot folder is named by its commit: the weights come from that same commit.
        return _snapshot(repo_id, head.name, HUB_FILES, cache, offline, local_first=True), None


def _hub_files(repo_id: str, snapshot: Path, cache: Path) -> list[str]:
    """The repo's files at the snapshot's commit: the listing huggingface_hub cached with it
    (no network call), else what the snapshot folder holds (a cache filled by hand)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=snapshot.name, cache_dir=cache)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        found = snapshot.rglob("*") if snapshot.is_dir() else []
        return [p.relative_to(snapshot).as_posix() for p in found if p.is_file()]


def _snapshot(
    repo_id: str, revision: str | None, patterns: list[str], cache: Path, offline: bool, local_first: bool
) -> Path:
    """``snapshot_download``, from the cache alone first when ``local_first``.

    huggingface_hub checks a cached snapshot against the file list it cached with it (and
    raises ``LocalEntryNotFoundError`` when files are missing); only then is the Hub asked.
    Without that, a commit asked for with the network down would spend ~25 s in the
    library's retries of the file listing.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    options: dict[str, Any] = {"allow_patterns": patterns, "cache_dir": cache}
    if local_first and not offline:
        with contextlib.suppress(LocalEntryNotFoundError):
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, **options))
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline, **options))
    except LocalEntryNotFoundError:
        # A ref written by hand with a trailing newline (`echo SHA > refs/main`): the library
        # reads it verbatim and misses the snapshot; the commit it names is used instead.
        ref = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else ""
        if not _COMMIT.fullmatch(commit) or commit == ref.read_text():
            raise
        return Path(snapshot_download(repo_id, revision=commit, local_files_only=True, **options))


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, cache: Path, offline: bool) -> Iterator[None]:
    """huggingface_hub's errors as one :class:`CheckpointError` line each (the token never shown)."""
    from huggingface_hub import errors as hf
    from huggingface_hub import get_token

    url = f"https://huggingface.co/{repo_id}"
    try:
        yield
    except hf.GatedRepoError as error:
        who = (
            "the token in use (HF_TOKEN or `hf auth login`) has not been granted it"
            if get_token()
            else ("no Hugging Face token is set: set HF_TOKEN or run `hf auth login`")
        )
        raise CheckpointError(f"{repo_id} is a gated repo and {who}; accept its licence at {url}") from error
    except hf.RepositoryNotFoundError as error:
        raise CheckpointError(
            f"{repo_id}: not found: no such local path, and no Hugging Face repo of that name "
            f"(or it is private and {'the token in use cannot see it' if get_token() else 'no token is set'})"
        ) from error
    except hf.RevisionNotFoundError as error:
        raise CheckpointError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)") from error
    except hf.IncompleteSnapshotError as error:
        raise CheckpointError(
            f"{repo_id}: the cached snapshot in {cache} is incomplete and the Hub cannot be reached; "
            "download it again with network"
        ) from error
    except hf.LocalEntryNotFoundError as error:
        rev = f" at revision {revision}" if revision else ""
        if offline:
            raise CheckpointError(
                f"{repo_id}{rev}: not found in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set: "
                f"download it once with network (`hf download {repo_id}`), or unset HF_HUB_OFFLINE"
            ) from error
        raise CheckpointError(
            f"{repo_id}{rev}: not found in the Hugging Face cache {cache}, and cannot reach the Hub: "
            "check the network (or the proxy), or fill the cache where there is one"
        ) from error
    except hf.HFValidationError as error:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repo id: {_first_line(error)}") from error
    except hf.HfHubHTTPError as error:
        raise CheckpointError(f"{repo_id}: Hugging Face Hub error: {_first_line(error)}") from error
    except OSError as error:  # writing the cache (disk full, read-only) or a token file that cannot be read
        raise CheckpointError(f"{repo_id}: cannot download into {cache}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Kaggle


def _from_kaggle(
    text: str, revision: str | None, dtype: str | None, progress: bool
) -> tuple[Path, Path | None]:
    try:
        import kagglehub
        from kagglehub.handle import parse_model_handle
    except ImportError:
        raise CheckpointError(
            f"{KAGGLE_PREFIX}{text}: Kaggle handles need the optional kagglehub package: "
            "pip install 'paligemma-xray[kaggle]'"
        ) from None
    name = KAGGLE_PREFIX + text
    try:
        handle = parse_model_handle(text)
    except ValueError:
        raise CheckpointError(
            f"{name} is not a Kaggle model handle: kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION], "
            "e.g. kaggle:google/paligemma/jax/paligemma-3b-pt-224"
        ) from None
    if revision is not None:
        if handle.is_versioned() or not str(revision).isdigit():
            raise CheckpointError(
                f"{name}: --revision for a Kaggle handle is a version number, given once "
                f"(in the handle or as --revision), not {revision!r}"
            )
        handle = handle.with_version(int(revision))
    try:
        with _kaggle_errors(name):
            folder = Path(kagglehub.model_download(str(handle)))
    except CheckpointError as error:
        # As huggingface_hub does: when Kaggle cannot say which version is current (no
        # network, no credentials, Kaggle down), a version already in the cache serves.
        cached = _cached_kaggle(handle)
        if cached is None:
            raise
        folder = cached
        reason = type(error.__cause__).__name__ if error.__cause__ else error.message
        logger.warning(
            "%s: Kaggle did not answer (%s); using the newest cached version %s", name, reason, folder
        )
    return _pick_npz(folder, name, handle.variation, dtype), _find_tokenizer(folder)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def _cached_kaggle(handle) -> Path | None:
    """The newest complete version of ``handle`` in kagglehub's cache (its own layout and markers)."""
    from kagglehub.cache import Cache, get_cached_path

    if handle.is_versioned():
        versions = [handle.version]
    else:
        variation = Path(get_cached_path(handle.with_version(1))).parent
        found = variation.iterdir() if variation.is_dir() else []
        versions = sorted((int(p.name) for p in found if p.is_dir() and p.name.isdigit()), reverse=True)
    cache = Cache()
    for version in versions:
        cached = cache.load_from_cache(handle.with_version(version))
        if cached:
            return Path(cached)
    return None


@contextlib.contextmanager
def _kaggle_errors(name: str) -> Iterator[None]:
    """kagglehub's errors as one :class:`CheckpointError` line each (credentials never shown)."""
    from kagglehub.exceptions import BackendError, KaggleApiHTTPError, UnauthenticatedError

    needs = (
        "set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json) and accept the model's licence "
        "on its Kaggle page"
    )
    try:
        yield
    except _connection_errors() as error:
        from kagglehub.config import get_cache_folder

        raise CheckpointError(
            f"{name}: not found in the kagglehub cache {get_cache_folder()} (KAGGLEHUB_CACHE), and "
            "cannot reach Kaggle: check the network, or fill the cache where there is one"
        ) from error
    except UnauthenticatedError as error:
        raise CheckpointError(f"{name}: Kaggle needs credentials: {needs}") from error
    except KaggleApiHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise CheckpointError(f"{name}: Kaggle refused access ({status}): {needs}") from error
        if status == 404:
            raise CheckpointError(f"{name}: no such model, variation or version on Kaggle") from error
        raise CheckpointError(f"{name}: Kaggle error: {_first_line(error)}") from error
    except BackendError as error:
        raise CheckpointError(f"{name}: Kaggle error: {_first_line(error)}") from error
    except ValueError as error:  # an unreadable ~/.kaggle/kaggle.json, a framework Kaggle does not know
        raise CheckpointError(f"{name}: {_first_line(error)}") from error
    except OSError as error:  # writing the cache: disk full, read-only
        raise CheckpointError(f"{name}: cannot download it: {error}") from error


def _npz_tag(path: PurePath) -> str:
    stem = path.name.removesuffix(".npz")
    tag = stem.rsplit(".", 1)[1] if "." in stem else ""
    return tag if tag in _NPZ_PREFERENCE else ""


def _pick_npz(folder: Path, name: str, variation: str, dtype: str | None) -> Path:
    """The variation's big_vision ``.npz`` in a download: of precision ``dtype``, else 16-bit first."""
    if not folder.is_dir():  # a single-file download
        folder = folder.parent
    found = sorted(folder.rglob("*.npz"))
    if not found:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{name}: the download has no big_vision .npz file (it holds: {listing})")
    return _choose_npz(found, variation, dtype)


def _choose_npz(found: list[PurePathT], variation: str, dtype: str | None) -> PurePathT:
    """Of the variation's files: the one of precision ``dtype``, else 16-bit first (as the colab)."""
    named = [p for p in found if p.name.startswith(variation)] or found
    if dtype is not None:
        wanted = [p for p in named if _npz_tag(p) in _NPZ_TAGS.get(str(dtype).removeprefix("torch."), ())]
        if wanted:
            return sorted(wanted)[0]
    return min(named, key=lambda p: (_NPZ_PREFERENCE.index(_npz_tag(p)), p.name))


def _find_tokenizer(folder: Path) -> Path | None:
    if not folder.is_dir():
        folder = folder.parent
    for tokenizer_name in TOKENIZER_NAMES:
        found = sorted(folder.rglob(tokenizer_name))
        if found:
            return found[0]
    return None
