"""One PACS run: query, retrieve, detect, store back; polling again with ``--watch``.

**Idempotent.** SR UIDs are derived from the source image's UID, the model's weights checksum
and the decoding settings, so before retrieving a study the run lists the instances of our
series in it: an image whose SR is already there is not retrieved again, and a study whose
images all have one is skipped. Running the same command twice stores nothing twice.

**Resumable.** The state file (:mod:`.state`) records the studies done for this model and
settings, so a rerun after a kill skips them without asking the PACS; a study cut in the
middle is finished from where the PACS says it stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paligemma_xray.pacs.client import Credentials, PacsClient, PacsError, connect
from paligemma_xray.pacs.settings import PacsSettings
from paligemma_xray.pacs.state import PacsState
from paligemma_xray.progress import bar as progress_bar


def run(
    detector: Any,
    settings: PacsSettings,
    *,
    credentials: Credentials | None = None,
    max_polls: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Query, retrieve, detect and store back; returns counts (studies, images, srs, skipped…).

    ``credentials``: see :func:`~paligemma_xray.pacs.client.load_credentials` (None: no
    login). With ``settings.watch``, poll again every ``settings.interval`` seconds for new
    studies until interrupted (``max_polls`` bounds the number of polls, for tests); an
    outage (after the retries) is logged and waited out, a refused login still stops it.
    See :mod:`paligemma_xray.pacs`.

    Raises:
        PacsError: the PACS is unreachable after the retries, refuses the credentials, or
            answers an error; the state file keeps what was done.
    """
    from paligemma_xray.infer import dicom_sr

    client = connect(
        settings.url,
        credentials,
        retries=settings.retries,
        backoff_s=settings.backoff,
        timeout_s=settings.timeout,
    )
    algorithm = dicom_sr.algorithm_of(detector)
    key = dicom_sr.settings_key(settings.prompt, settings.threshold)
    state = PacsState.load(settings.state, f"{algorithm.checksum}|{key}")
    say = log or (lambda message: None)
    totals = {"studies": 0, "images": 0, "srs": 0, "skipped_studies": 0, "skipped_images": 0}
    job = _Job(PacsClient(client, settings.url, settings.retries), detector, settings, algorithm, key)
    polls = 0
    while True:
        polls += 1
        try:
            _poll(job, state, totals, progress)
        except PacsError as error:
            if not (settings.watch and error.transient):
                raise
            # Watching: an outage is waited out (what was done is in the state file).
            say(f"pacs: {error}; trying again in {settings.interval:g} s")
        else:
            if settings.watch:
                say(f"pacs: {totals['srs']} SR(s) stored so far; next poll in {settings.interval:g} s")
        if not settings.watch or (max_polls is not None and polls >= max_polls):
            return totals
        time.sleep(settings.interval)


def _poll(job: _Job, state: PacsState, totals: dict[str, int], progress: bool) -> None:
    """One pass over the studies found now."""
    found = job.pacs.find_studies(job.settings.studies, job.settings.since_date)
    with progress_bar(found, desc="pacs", unit="study", enabled=progress) as bar:
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
    """What every study of a run shares: the PACS, the detector, the settings, our identity."""

    pacs: PacsClient
    detector: Any
    settings: PacsSettings
    algorithm: Any
    key: str
    """The decoding settings our SR UIDs derive from (``dicom_sr.settings_key``)."""

    def study(self, study_uid: str) -> dict[str, int]:
        from paligemma_xray.infer import dicom_sr

        our_series, _ = dicom_sr.sr_uids(study_uid, "", self.algorithm, self.key)
        viewer_series, _ = dicom_sr.viewer_sr_uids(study_uid, "", self.algorithm, self.key)
        ours = {our_series, viewer_series, dicom_sr.sc_series_uid(study_uid, self.algorithm)}
        images = self.pacs.images(study_uid, ours, self.settings.modalities)
        existing = self.pacs.instances(study_uid, our_series) if images else set()
        todo = [
            img
            for img in images
            if dicom_sr.sr_uids(study_uid, img[1], self.algorithm, self.key)[1] not in existing
        ]
        counts = {"images": 0, "srs": 0, "skipped_images": len(images) - len(todo)}
        size = max(1, self.settings.batch_size)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            sources = [self.pacs.retrieve(study_uid, series_uid, sop_uid) for series_uid, sop_uid, _ in chunk]
            self.pacs.store(self._detect_and_build(sources), study_uid)
            counts["images"] += len(chunk)
            counts["srs"] += len(chunk)
        return counts

    def _detect_and_build(self, sources: list[tuple[str, bytes]]) -> list[Any]:
        from paligemma_xray.data import load_image
        from paligemma_xray.infer import dicom_sr

        images = [load_image(data, name=name) for name, data in sources]
        found = self.detector.detect(
            images,
            self.settings.prompt,
            batch_size=len(images),
            threshold=self.settings.threshold,
            max_new_tokens=self.settings.max_new_tokens,
        )
        outputs = []
        for (name, data), image, detections in zip(sources, images, found):
            outputs += dicom_sr.build_for_image(
                data,
                detections,
                self.algorithm,
                calibration=self.detector.calibration,
                settings=self.key,
                secondary_capture=self.settings.secondary_capture,
                image=image,
                name=name,
            )
            if detections.has_masks:  # a segment prompt with --seg-vae: the masks as a DICOM SEG
                from paligemma_xray.infer.dicom_seg import build_seg

                outputs.append(build_seg(data, detections, self.algorithm, settings=self.key, name=name))
        return outputs
