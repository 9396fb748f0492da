"""A PACS client: query studies over DICOMweb, detect, and store DICOM SRs back.

Three modules: :mod:`.client` (DICOMweb calls, credentials, retries), :mod:`.state` (the
resumable state file), :mod:`.run` (query/retrieve/detect/store, taking
:class:`~.settings.PacsSettings`).

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

from paligemma_xray.pacs.client import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    RETRY_STATUS,
    Credentials,
    PacsClient,
    PacsError,
    PacsUnavailable,
    connect,
    display_url,
    load_credentials,
)
from paligemma_xray.pacs.run import run
from paligemma_xray.pacs.settings import DEFAULT_MODALITIES, PacsSettings, parse_modalities, parse_since
from paligemma_xray.pacs.state import STATE_VERSION, PacsState

__all__ = [
    "DEFAULT_MODALITIES",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "RETRY_STATUS",
    "STATE_VERSION",
    "Credentials",
    "PacsClient",
    "PacsError",
    "PacsSettings",
    "PacsState",
    "PacsUnavailable",
    "connect",
    "display_url",
    "load_credentials",
    "parse_modalities",
    "parse_since",
    "run",
]
