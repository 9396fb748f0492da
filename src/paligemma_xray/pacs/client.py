"""The DICOMweb side of the PACS client: connection, credentials, retries, the calls we make.

Through ``dicomweb-client`` (the maintained DICOMweb client). **Failures.** Connection errors,
timeouts and HTTP 429/500/502/503/504 are retried with exponential backoff (urllib3's
``Retry`` on the HTTP session; ``--retries``, ``--backoff``); then one :class:`PacsError`
line says what failed. A 401/403 is reported at once (retrying a refused login does not
help). **Credentials** come from the environment (``PALIGEMMA_XRAY_PACS_USER`` and
``PALIGEMMA_XRAY_PACS_PASSWORD`` for HTTP basic auth, or ``PALIGEMMA_XRAY_PACS_TOKEN`` for a
bearer token) or a file (``--credentials FILE``: JSON ``{"user": …, "password": …}`` or
``{"token": …}``). They are never printed: messages show the URL without user information, a
URL that carries a password is refused, and :class:`Credentials` hides them in its ``repr``.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from paligemma_xray.errors import ConfigError, PaligemmaXrayError

ENV_USER = "PALIGEMMA_XRAY_PACS_USER"
ENV_PASSWORD = "PALIGEMMA_XRAY_PACS_PASSWORD"
ENV_TOKEN = "PALIGEMMA_XRAY_PACS_TOKEN"
RETRY_STATUS = (429, 500, 502, 503, 504)
# Objects that are not images to detect on, whatever series they sit in.
NOT_IMAGES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "DOC", "REG"}
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, MODALITY = (
    "0020000D",
    "0020000E",
    "00080018",
    "00080016",
    "00080060",
)


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


def check_url(url: str) -> str:
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

    url = check_url(url)
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


def call(what: str, url: str, retries: int, fn: Callable[[], Any]) -> Any:
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


def value(item: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute (``"0020000D"``), or None."""
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


@dataclass
class PacsClient:
    """The DICOMweb requests a run makes, each failure one :class:`PacsError` line."""

    client: Any
    """A ``dicomweb_client.DICOMwebClient`` (:func:`connect`)."""
    url: str
    retries: int

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return call(what, self.url, self.retries, fn)

    def find_studies(self, studies: Sequence[str] | None, since: Any) -> list[str]:
        """QIDO-RS: the given studies (each must exist), or every study from ``since`` on."""
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
        return sorted({value(h, STUDY_UID) for h in hits if value(h, STUDY_UID)})

    def images(self, study_uid: str, ours: set[str], modalities: Sequence[str]) -> list[tuple[str, str, str]]:
        """(series, SOP instance, SOP class) of the study's images of the wanted modalities.

        ``ours``: our own series (SR, SC), never detected on; ``modalities`` empty: all.
        """
        series = self._call(
            f"listing the series of study {study_uid}",
            lambda: self.client.search_for_series(study_uid, get_remaining=True),
        )
        images = []
        for item in sorted(series, key=lambda s: str(value(s, SERIES_UID))):
            modality = str(value(item, MODALITY) or "").upper()
            series_uid = value(item, SERIES_UID)
            if (
                not series_uid
                or series_uid in ours
                or modality in NOT_IMAGES
                or (modalities and modality not in modalities)
            ):
                continue
            instances = self._call(
                f"listing the instances of series {series_uid}",
                functools.partial(
                    self.client.search_for_instances, study_uid, series_uid, get_remaining=True
                ),
            )
            for inst in sorted(instances, key=lambda i: str(value(i, SOP_UID))):
                if value(inst, SOP_UID):
                    images.append((series_uid, value(inst, SOP_UID), str(value(inst, SOP_CLASS) or "")))
        return images

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOP Instance UIDs already in a series (our reports' series)."""
        hits = self._call(
            f"looking for our reports in study {study_uid}",
            lambda: self.client.search_for_instances(study_uid, series_uid, get_remaining=True),
        )
        return {str(value(h, SOP_UID)) for h in hits or []}

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> tuple[str, bytes]:
        """WADO-RS in the stored transfer syntax: ``(a name for messages, the DICOM file's bytes)``."""
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

    def store(self, datasets: list[Any], study_uid: str) -> None:
        """STOW-RS of new instances into a study."""
        self._call(
            f"storing {len(datasets)} report(s) in study {study_uid}",
            functools.partial(self.client.store_instances, datasets, study_uid),
        )
