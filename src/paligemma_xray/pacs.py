"""A PACS client: query studies over DICOMweb, detect, and store DICOM SRs back.

``paligemma-xray pacs --url URL`` does, through ``dicomweb-client`` (the maintained DICOMweb
client):

1. **QIDO-RS**: the studies (all, one ``--study``, or those from ``--since`` a date on), then
   each study's series of the wanted modalities (``--modality CR,DX``) and their instances;
2. **WADO-RS**: every instance that does not have our report yet, in its stored transfer
   syntax (decoded here, by pydicom);
3. detection (:class:`~paligemma_xray.infer.Detector`), one batch at a time;
4. **STOW-RS**: one Comprehensive SR per image (:mod:`paligemma_xray.infer.dicom_sr`), and a
   Secondary Capture with the boxes drawn when asked.

It never modifies or deletes anything on the PACS: it only reads images and adds new SR (and
SC) instances, in a series of their own (one per study and model).

**Idempotent.** SR UIDs are derived from the source image's UID, the model's weights checksum
and the decoding settings, so before retrieving a study the client lists the instances of
our series in it: an image whose SR is already there is not retrieved again, and a study
whose images all have one is skipped. Running the same command twice stores nothing twice.

**Resumable.** The state file (``--state``, written atomically after each study) records the
studies done for this model and settings, so a rerun after a kill skips them without asking
the PACS; a study cut in the middle is finished from where the PACS says it stands.

**Failures.** Connection errors, timeouts and HTTP 429/500/502/503/504 are retried with
exponential backoff (urllib3's ``Retry`` on the HTTP session; ``--retries``, ``--backoff``);
then the run stops with one line saying what failed, and the state file holds what was done.
A 401/403 is reported at once (retrying a refused login does not help).

**Credentials** come from the environment (``PALIGEMMA_XRAY_PACS_USER`` and
``PALIGEMMA_XRAY_PACS_PASSWORD`` for HTTP basic auth, or ``PALIGEMMA_XRAY_PACS_TOKEN`` for a
bearer token) or a file (``--credentials FILE``: JSON ``{"user": …, "password": …}`` or
``{"token": …}``). They are never printed: messages show the URL without user information, a
URL that carries a password is refused, and :class:`Credentials` hides them in its ``repr``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tqdm.auto import tqdm

from paligemma_xray.errors import ConfigError, PaligemmaXrayError

ENV_USER = "PALIGEMMA_XRAY_PACS_USER"
ENV_PASSWORD = "PALIGEMMA_XRAY_PACS_PASSWORD"
ENV_TOKEN = "PALIGEMMA_XRAY_PACS_TOKEN"
RETRY_STATUS = (429, 500, 502, 503, 504)
STATE_VERSION = 1
DEFAULT_MODALITIES = ("CR", "DX")
# Objects that are not images to detect on, whatever series they sit in.
_NOT_IMAGES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "DOC", "REG"}


class PacsError(PaligemmaXrayError):
    """The PACS could not be reached, refused us, or answered what we could not use.

    ``transient``: down, timing out or answering 429/5xx (``--watch`` waits and tries again).
    """

    transient = False


class PacsUnavailable(PacsError):
    """The PACS is down or overloaded, after the retries."""

    transient = True


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (user, password) or bearer (token) credentials; never shown by ``repr``."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        kind = "token" if self.token else "basic" if self.user else "none"
        return f"Credentials({kind}, hidden)"


def load_credentials(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """Credentials from ``path`` (JSON) if given, else from the environment; ``None`` when neither."""
    env = os.environ if env is None else env
    if path is not None:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("credentials file not found", path=path) from None
        except (OSError, ValueError) as error:
            # The message must not quote the file's content: it holds a password.
            raise ConfigError(
                f"credentials file is not readable JSON ({type(error).__name__})", path=path
            ) from None
        if not isinstance(data, dict) or not (data.get("token") or (data.get("user") and "password" in data)):
            raise ConfigError(
                'credentials file must hold {"user": …, "password": …} or {"token": …}', path=path
            )
        return Credentials(user=data.get("user"), password=data.get("password"), token=data.get("token"))
    if env.get(ENV_TOKEN):
        return Credentials(token=env[ENV_TOKEN])
    if env.get(ENV_USER):
        return Credentials(user=env[ENV_USER], password=env.get(ENV_PASSWORD, ""))
    return None


def display_url(url: str) -> str:
    """``url`` without user information, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--url must be an http(s) DICOMweb root (http://pacs:8042/dicom-web), not {display_url(url)!r}"
        )
    if parts.password is not None:
        raise ConfigError(
            f"the PACS URL carries a password; give credentials through {ENV_USER}/{ENV_PASSWORD}, "
            f"{ENV_TOKEN} or --credentials FILE instead (URLs end up in logs): {display_url(url)}"
        )
    return url.rstrip("/")


def connect(
    url: str,
    credentials: Credentials | None = None,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` whose session retries with backoff.

    One retry policy for everything (urllib3's ``Retry``, mounted on the requests session):
    connection errors, read timeouts and :data:`RETRY_STATUS` answers, for every method (STOW
    is safe to repeat: our UIDs are fixed, a PACS stores an instance once). The waits are
    ``backoff_s × 2^(n-1)`` seconds, at most two minutes, honouring ``Retry-After``.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    url = _check_url(url)
    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise ConfigError("--retries and --backoff must be >= 0 and the timeout > 0")
    session = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=retries,
        backoff_factor=backoff_s,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if credentials is not None and credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials is not None and credentials.user:
        session.auth = (credentials.user, credentials.password or "")
    client = DICOMwebClient(url, session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)  # the session retries; not twice
    return client


def _call(what: str, url: str, retries: int, fn: Callable[[], Any]) -> Any:
    """Run one DICOMweb request; its failure becomes one :class:`PacsError` line."""
    import requests

    try:
        return fn()
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if status in (401, 403):
            raise PacsError(
                f"PACS at {display_url(url)} refused the credentials (HTTP {status}) while {what}"
            ) from None
        if status in RETRY_STATUS:
            raise PacsUnavailable(
                f"PACS at {display_url(url)} answered HTTP {status} after {retries} retries while {what}"
            ) from None
        raise PacsError(f"PACS at {display_url(url)} answered HTTP {status} while {what}") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        reason = type(error).__name__
        raise PacsUnavailable(
            f"PACS at {display_url(url)} is unreachable ({reason}) after {retries} retries while {what}; "
            "rerun the same command to resume"
        ) from None
    except requests.RequestException as error:
        raise PacsError(f"PACS at {display_url(url)}: {type(error).__name__} while {what}") from None


# -- state ------------------------------------------------------------------------------------


@dataclass
class PacsState:
    """What a run has done, per model and settings; saved atomically after every study."""

    path: Path
    key: str  # model checksum + settings
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, key: str) -> PacsState:
        path = Path(path)
        if not path.is_file():
            return cls(path, key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"state file is not readable JSON: {error}", path=path) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ConfigError("not a pacs state file of this version (remove it to start afresh)", path=path)
        runs = data.get("runs", {})
        return cls(path, key, dict(runs.get(key, {}).get("studies", {})))

    def done(self, study_uid: str) -> bool:
        return self.studies.get(study_uid, {}).get("status") == "done"

    def record(self, study_uid: str, **info: Any) -> None:
        from paligemma_xray.atomic import write_json

        self.studies[study_uid] = {"status": "done", "at": _now(), **info}
        data: dict[str, Any] = {"version": STATE_VERSION, "runs": {}}
        if self.path.is_file():
            # An unreadable or older state file is replaced: it only records what is already done.
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(self.path.read_text())
                if isinstance(old, dict) and old.get("version") == STATE_VERSION:
                    data = old
        data.setdefault("runs", {})[self.key] = {"studies": self.studies}
        write_json(self.path, data)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the run ----------------------------------------------------------------------------------


def _value(item: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute (``"0020000D"``), or None."""
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, MODALITY = (
    "0020000D",
    "0020000E",
    "00080018",
    "00080016",
    "00080060",
)


def parse_since(text: str | None) -> datetime.date | None:
    """``--since``: YYYY-MM-DD or YYYYMMDD."""
    if text is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise ConfigError(f"--since takes a date as YYYY-MM-DD, not {text!r}")


def parse_modalities(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--modality CR,DX`` → ("CR", "DX"); an empty value means every image modality."""
    if text is None:
        return DEFAULT_MODALITIES
    items = text.split(",") if isinstance(text, str) else list(text)
    found = tuple(m.strip().upper() for m in items if m.strip())
    for modality in found:
        if not modality.isalnum() or len(modality) > 16:
            raise ConfigError(f"--modality takes DICOM modality codes like CR,DX, not {modality!r}")
    return found


def run(
    detector: Any,
    url: str,
    *,
    studies: Sequence[str] | None = None,
    since: datetime.date | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    prompt: str = "detect fracture",
    threshold: float | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    secondary_capture: bool = False,
    state_path: str | Path = "pacs-state.json",
    credentials: Credentials | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    watch: bool = False,
    interval_s: float = 60.0,
    max_polls: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Query, retrieve, detect and store back; returns counts (studies, images, srs, skipped…).

    ``watch``: poll again every ``interval_s`` seconds for new studies until interrupted
    (``max_polls`` bounds the number of polls, for tests); an outage (after the retries) is
    logged and waited out, a refused login still stops it. See the module docstring.

    Raises:
        PacsError: the PACS is unreachable after the retries, refuses the credentials, or
            answers an error; the state file keeps what was done.
        ConfigError: a bad option.
    """
    from paligemma_xray.infer import dicom_sr
    from paligemma_xray.infer.detector import is_detection_prompt

    if not is_detection_prompt(prompt):
        raise ConfigError(f"pacs needs a detection prompt ('detect …'), not {prompt!r}")
    if interval_s <= 0:
        raise ConfigError("--interval must be > 0 seconds")
    client = connect(url, credentials, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    algorithm = dicom_sr.algorithm_of(detector)
    settings = dicom_sr.settings_key(prompt, threshold)
    state = PacsState.load(state_path, f"{algorithm.checksum}|{settings}")
    say = log or (lambda message: None)
    totals = {"studies": 0, "images": 0, "srs": 0, "skipped_studies": 0, "skipped_images": 0}
    job = _Job(
        client,
        url,
        retries,
        detector,
        algorithm,
        settings,
        prompt,
        threshold,
        max_new_tokens,
        batch_size,
        secondary_capture,
        tuple(m.upper() for m in modalities),
    )
    polls = 0
    while True:
        polls += 1
        try:
            _poll(job, state, studies, since, totals, progress)
        except PacsError as error:
            if not (watch and error.transient):
                raise
            # Watching: an outage is waited out (what was done is in the state file).
            say(f"pacs: {error}; trying again in {interval_s:g} s")
        else:
            if watch:
                say(f"pacs: {totals['srs']} SR(s) stored so far; next poll in {interval_s:g} s")
        if not watch or (max_polls is not None and polls >= max_polls):
            return totals
        time.sleep(interval_s)


def _poll(job: _Job, state: PacsState, studies, since, totals: dict[str, int], progress: bool) -> None:
    """One pass over the studies found now."""
    found = job.find_studies(studies, since)
    with tqdm(found, desc="pacs", unit="study", disable=not progress) as bar:
        for study_uid in bar:
            if state.done(study_uid):
                totals["skipped_studies"] += 1
                continue
            counts = job.study(study_uid)
            totals["studies"] += 1
            for key in ("images", "srs", "skipped_images"):
                totals[key] += counts[key]
            if counts["images"] == 0 and counts["skipped_images"]:
                totals["skipped_studies"] += 1
            state.record(study_uid, **counts)
            bar.set_postfix(images=totals["images"], srs=totals["srs"], refresh=False)


@dataclass
class _Job:
    client: Any
    url: str
    retries: int
    detector: Any
    algorithm: Any
    settings: str
    prompt: str
    threshold: float | None
    max_new_tokens: int | None
    batch_size: int | None
    secondary_capture: bool
    modalities: tuple[str, ...]

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return _call(what, self.url, self.retries, fn)

    def find_studies(self, studies: Sequence[str] | None, since: datetime.date | None) -> list[str]:
        filters: dict[str, Any] = {}
        if since is not None:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        if studies:
            found = []
            for uid in studies:
                hits = self._call(
                    f"looking up study {uid}",
                    functools.partial(
                        self.client.search_for_studies,
                        search_filters={**filters, "StudyInstanceUID": uid},
                        get_remaining=True,
                    ),
                )
                if not hits:
                    raise PacsError(f"PACS at {display_url(self.url)} has no study {uid}")
                found.append(uid)
            return found
        hits = self._call(
            "searching for studies",
            lambda: self.client.search_for_studies(search_filters=filters or None, get_remaining=True),
        )
        return sorted({_value(h, STUDY_UID) for h in hits if _value(h, STUDY_UID)})

    def _images(self, study_uid: str, ours: set[str]) -> list[tuple[str, str, str]]:
        """(series, SOP instance, SOP class) of the study's images of the wanted modalities.

        ``ours``: our own series (SR, SC), never detected on.
        """
        series = self._call(
            f"listing the series of study {study_uid}",
            lambda: self.client.search_for_series(study_uid, get_remaining=True),
        )
        images = []
        for item in sorted(series, key=lambda s: str(_value(s, SERIES_UID))):
            modality = str(_value(item, MODALITY) or "").upper()
            series_uid = _value(item, SERIES_UID)
            if (
                not series_uid
                or series_uid in ours
                or modality in _NOT_IMAGES
                or (self.modalities and modality not in self.modalities)
            ):
                continue
            instances = self._call(
                f"listing the instances of series {series_uid}",
                functools.partial(
                    self.client.search_for_instances, study_uid, series_uid, get_remaining=True
                ),
            )
            for inst in sorted(instances, key=lambda i: str(_value(i, SOP_UID))):
                if _value(inst, SOP_UID):
                    images.append((series_uid, _value(inst, SOP_UID), str(_value(inst, SOP_CLASS) or "")))
        return images

    def _existing(self, study_uid: str, series_uid: str) -> set[str]:
        hits = self._call(
            f"looking for our reports in study {study_uid}",
            lambda: self.client.search_for_instances(study_uid, series_uid, get_remaining=True),
        )
        return {str(_value(h, SOP_UID)) for h in hits or []}

    def study(self, study_uid: str) -> dict[str, int]:
        from paligemma_xray.infer import dicom_sr

        our_series, _ = dicom_sr.sr_uids(study_uid, "", self.algorithm, self.settings)
        viewer_series, _ = dicom_sr.viewer_sr_uids(study_uid, "", self.algorithm, self.settings)
        images = self._images(
            study_uid, {our_series, viewer_series, dicom_sr.sc_series_uid(study_uid, self.algorithm)}
        )
        existing = self._existing(study_uid, our_series) if images else set()
        todo = [
            img
            for img in images
            if dicom_sr.sr_uids(study_uid, img[1], self.algorithm, self.settings)[1] not in existing
        ]
        counts = {"images": 0, "srs": 0, "skipped_images": len(images) - len(todo)}
        size = max(1, self.batch_size or getattr(self.detector, "batch_size", 8) or 8)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            sources = [self._retrieve(study_uid, series_uid, sop_uid) for series_uid, sop_uid, _ in chunk]
            outputs = self._detect_and_build(sources)
            self._call(
                f"storing {len(outputs)} report(s) in study {study_uid}",
                functools.partial(self.client.store_instances, outputs, study_uid),
            )
            counts["images"] += len(chunk)
            counts["srs"] += len(chunk)
        return counts

    def _retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> tuple[str, bytes]:
        ds = self._call(
            f"retrieving instance {sop_uid}",
            lambda: self.client.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)
            ),
        )
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return (
            f"{display_url(self.url)}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            buffer.getvalue(),
        )

    def _detect_and_build(self, sources: Iterable[tuple[str, bytes]]) -> list[Any]:
        from paligemma_xray.data import load_image
        from paligemma_xray.infer import dicom_sr

        sources = list(sources)
        images = [load_image(data, name=name) for name, data in sources]
        kwargs: dict[str, Any] = {"batch_size": len(images), "threshold": self.threshold}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        found = self.detector.detect(images, self.prompt, **kwargs)
        outputs = []
        for (name, data), image, detections in zip(sources, images, found):
            boxes, whole = dicom_sr.calibrated(self.detector, detections)
            outputs.append(
                dicom_sr.build_sr(
                    data,
                    detections,
                    self.algorithm,
                    probability=boxes,
                    image_probability=whole,
                    settings=self.settings,
                    name=name,
                )
            )
            shown = dicom_sr.build_viewer_sr(
                data, detections, self.algorithm, settings=self.settings, name=name
            )
            if shown is not None:  # the boxes in the encoding OHIF draws
                outputs.append(shown)
            if self.secondary_capture:
                outputs.append(
                    dicom_sr.build_secondary_capture(
                        data, image, detections, self.algorithm, settings=self.settings, name=name
                    )
                )
        return outputs
