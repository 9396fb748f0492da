"""``paligemma-xray pacs``: detect on a PACS's radiographs over DICOMweb, store SRs back."""

from __future__ import annotations

from typing import Any

from paligemma_xray.cli.parser import say, verb
from paligemma_xray.pacs.client import ENV_PASSWORD, ENV_TOKEN, ENV_USER
from paligemma_xray.pacs.settings import PacsSettings

EXAMPLES = [
    "paligemma-xray pacs --url http://orthanc:8042/dicom-web --model runs/r1 --since 2026-11-01",
    "paligemma-xray pacs --url http://orthanc:8042/dicom-web --model runs/r1 --watch --interval 300",
]


def pacs(settings: PacsSettings) -> int:
    from paligemma_xray.pacs import connect, load_credentials, run

    credentials = load_credentials(settings.credentials)
    connect(settings.url, credentials)  # a bad URL or credentials file is refused before the model loads
    totals = run(settings.load_detector(), settings, credentials=credentials, log=say)
    say(
        f"pacs: {totals['studies']} study(ies) processed, {totals['images']} image(s) detected, "
        f"{totals['srs']} SR(s) stored; skipped {totals['skipped_studies']} study(ies) and "
        f"{totals['skipped_images']} image(s) that already had our report"
    )
    return 0


def register(verbs: Any) -> None:
    verb(
        verbs,
        "pacs",
        pacs,
        help="detect on a PACS's radiographs over DICOMweb and store DICOM SRs back",
        description="Query studies on the DICOMweb server URL (QIDO-RS), retrieve their CR/DX images\n"
        "(WADO-RS), detect, and store one DICOM SR per image back in the study\n"
        "(STOW-RS), in a series of its own. Never changes or deletes anything else.\n"
        "Idempotent (images that already have our SR for this model are skipped) and\n"
        f"resumable (--state). Credentials: ${ENV_USER} and ${ENV_PASSWORD},\n"
        f"or ${ENV_TOKEN}, or --credentials FILE; never printed.",
        examples=EXAMPLES,
        settings=PacsSettings,
    )
