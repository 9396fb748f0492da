"""`paligemma-xray pacs` SIGKILLed mid-run, then run again: the PACS ends as after one clean run.

Against real Orthanc servers (skipped where Orthanc is not installed), through the public
entry points only (the CLI and ``paligemma_xray.pacs.ENV_*``): one server gets an
uninterrupted run, the other the same images, a run killed after its first SR was stored,
and a second run. Both must hold the same SRs (the same SOP Instance UIDs, one per image,
the same boxes), nothing stored twice, and a state file that is whole JSON after the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from infer.dicom_samples import study
from orthanc_server import PASSWORD, USER, Orthanc

from paligemma_xray import pacs
from paligemma_xray.cli import main

REPO = Path(__file__).resolve().parents[1]


def _boxes_by_image(url: str) -> dict[str, dict[str, np.ndarray]]:
    """{image SOP UID: {SR SOP UID: boxes}} for every SR on the PACS (read with highdicom)."""
    client = DICOMwebClient(url, session=create_session_from_user_pass(USER, PASSWORD))
    found: dict[str, dict[str, np.ndarray]] = {}
    for series in client.search_for_series(search_filters={"Modality": "SR"}, get_remaining=True):
        study_uid, series_uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
        for inst in client.search_for_instances(study_uid, series_uid, get_remaining=True):
            ds = client.retrieve_instance(study_uid, series_uid, inst["00080018"]["Value"][0])
            sr = hd.sr.ComprehensiveSR.from_dataset(ds)
            image = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            groups = sr.content.get_planar_roi_measurement_groups()
            boxes = np.array([np.asarray(g.roi.value)[[0, 2]].ravel() for g in groups]).reshape(-1, 4)
            uid = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.setdefault(uid, {})[str(ds.SOPInstanceUID)] = boxes
    return found


@pytest.mark.slow
def test_pacs_killed_mid_run_then_rerun_stores_each_sr_once(tiny_boxes_hf_dir, tmp_path, monkeypatch) -> None:
    reference, killed = Orthanc(tmp_path / "reference").start(), Orthanc(tmp_path / "killed").start()
    try:
        images = [path for k in range(4) for path in study(tmp_path / f"s{k}", n=2, seed=10 * k)]
        for server in (reference, killed):
            server.upload(images)
        uploaded = killed.count()
        monkeypatch.setenv(pacs.ENV_USER, USER)
        monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)
        model = ["--model", str(tiny_boxes_hf_dir), "--no-progress"]
        assert main(["pacs", "--url", reference.url, "--state", str(tmp_path / "ref.json"), *model]) == 0

        state = tmp_path / "state.json"
        args = ["pacs", "--url", killed.url, "--state", str(state), *model]
        # The same thread count as this process: the scores are float sums.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO / "src")}
        process = subprocess.Popen(
            [sys.executable, "-m", "paligemma_xray.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and killed.count() == uploaded:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        stored = killed.count() - uploaded
        assert 1 <= stored < reference.count() - uploaded, "the kill came after the run had finished"
        if state.exists():  # written atomically after each study: whole JSON, or absent
            assert json.loads(state.read_text())["version"] == pacs.STATE_VERSION

        assert main(args) == 0  # the rerun finishes what the killed run left
        assert killed.count() == reference.count()  # nothing stored twice
        expected, got = _boxes_by_image(reference.url), _boxes_by_image(killed.url)
        assert expected.keys() == got.keys() and len(got) == len(images)
        for image_uid, srs in expected.items():
            # The same SR UIDs (the report, and the viewer's boxes where there are boxes), once each.
            assert srs.keys() == got[image_uid].keys() and 1 <= len(srs) <= 2
            for sr_uid, boxes in srs.items():
                np.testing.assert_array_equal(got[image_uid][sr_uid], boxes)  # the same boxes
    finally:
        reference.stop()
        killed.stop()
