"""`paligemma-xray pacs` against a real PACS (Orthanc + DICOMweb), not a mock.

End to end: radiographs (CR and DX; MONOCHROME1 and 2; uncompressed, RLE and JPEG-LS) go
into Orthanc through its own REST API; ``pacs`` queries, retrieves, detects and stores SRs;
the SRs are fetched back and checked with highdicom against ``predict``'s JSON on the same
files. Then: a rerun stores nothing twice; Orthanc stopped mid-run gives one clear error and
a clean resume; a server answering 503 is retried with backoff; credentials never show.
"""

from __future__ import annotations

import http.server
import json
import threading

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from infer.dicom_samples import radiograph, study
from orthanc_server import PASSWORD, USER, Orthanc

from paligemma_xray import pacs
from paligemma_xray.cli import main
from paligemma_xray.errors import ConfigError
from paligemma_xray.infer import dicom_sr


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


@pytest.fixture
def pacs_env(monkeypatch):
    monkeypatch.setenv(pacs.ENV_USER, USER)
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)


def _srs(url: str, series_number: int = dicom_sr.SERIES_NUMBER_SR) -> dict[str, hd.sr.ComprehensiveSR]:
    """Our reports on the PACS (the full ones; ``SERIES_NUMBER_VIEWER_SR``: the viewer SRs), by the
    SOP Instance UID of the image each reports on (read with highdicom)."""
    client = DICOMwebClient(url, session=create_session_from_user_pass(USER, PASSWORD))
    found = {}
    for series in client.search_for_series(search_filters={"Modality": "SR"}, get_remaining=True):
        study_uid, series_uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
        for inst in client.search_for_instances(study_uid, series_uid, get_remaining=True):
            ds = client.retrieve_instance(study_uid, series_uid, inst["00080018"]["Value"][0])
            if int(ds.SeriesNumber) != series_number:
                continue
            sr = hd.sr.ComprehensiveSR.from_dataset(ds)
            image = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            found[image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = sr
    return found


def test_pacs_round_trip_matches_predict_and_never_duplicates(
    orthanc, pacs_env, tiny_boxes_hf_dir, tmp_path, capsys
):
    cr = study(tmp_path / "cr", n=4, seed=0)  # M2, M1, RLE, JPEG-LS
    dx = study(tmp_path / "dx", n=2, seed=10, modality="DX")
    other = radiograph(tmp_path / "ot.dcm", modality="OT", seed=20, patient_id="PX0020")  # not CR/DX
    orthanc.upload([*cr, *dx, other])
    uploaded = orthanc.count()
    state = tmp_path / "state.json"
    args = ["pacs", "--url", orthanc.url, "--model", str(tiny_boxes_hf_dir), "--state", str(state)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "6 image(s) detected, 6 SR(s) stored" in err and PASSWORD not in err
    assert "study/s" in err  # the project's progress bar, as plain lines off a terminal

    # predict on the same files is the reference for the boxes.
    out = tmp_path / "predicted"
    assert main(["predict", "--model", str(tiny_boxes_hf_dir), *map(str, [*cr, *dx]), "--out", str(out)]) == 0
    srs = _srs(orthanc.url)
    assert len(srs) == 6
    shown = _srs(orthanc.url, dicom_sr.SERIES_NUMBER_VIEWER_SR)  # the boxes as OHIF draws them
    n_boxes = 0
    for path in [*cr, *dx]:
        source = pydicom.dcmread(path)
        sr = srs[source.SOPInstanceUID]  # each SR references its image…
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
        # predict names outputs by the path below the inputs' common folder (tmp_path here)
        record = json.loads((out / "json" / f"{path.relative_to(tmp_path).as_posix()}.json").read_text())
        expected = np.array([d["box"] for d in record["detections"]["detections"]]).reshape(-1, 4)
        groups = sr.content.get_planar_roi_measurement_groups()
        got = np.array([np.asarray(g.roi.value)[[0, 2]].ravel() for g in groups]).reshape(-1, 4)
        for group in groups:  # …in every region too
            assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
                source.SOPInstanceUID
            )
        np.testing.assert_allclose(got, expected, atol=1.0)  # …and has predict's boxes within a pixel
        n_boxes += len(expected)
        if len(expected):  # a viewer SR beside it, with the same regions; none without a box
            regions = shown[source.SOPInstanceUID].content.get_planar_roi_measurement_groups()
            np.testing.assert_allclose(
                [np.asarray(g.roi.value) for g in regions], [g.roi.value for g in groups]
            )
        else:
            assert source.SOPInstanceUID not in shown
    assert n_boxes > 0
    assert other.name and orthanc.count() == uploaded + 6 + len(shown)  # nothing for the OT image

    # Again, with the state file and without it: nothing is stored twice.
    assert main(args) == 0
    assert "skipped 3 study(ies)" in capsys.readouterr().err  # the OT study too: done, nothing in it
    state.unlink()
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "0 SR(s) stored" in err
    assert "study/s" not in err  # --no-progress silences the bar (it used to be tqdm's own, always on)
    assert orthanc.count() == uploaded + 6 + len(shown)


class _StopsThePacs:
    """A Detector whose second batch stops Orthanc: the PACS goes down mid-run."""

    def __init__(self, detector, orthanc):
        self._detector, self._orthanc, self.calls = detector, orthanc, 0

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def detect(self, *args, **kwargs):
        self.calls += 1
        found = self._detector.detect(*args, **kwargs)
        if self.calls == 2:
            self._orthanc.stop()
        return found


def test_pacs_down_mid_run_is_one_clear_error_then_a_clean_resume(orthanc, tiny_boxes_hf_dir, tmp_path):
    from paligemma_xray.infer import Detector

    first, second = study(tmp_path / "a", n=2, seed=0), study(tmp_path / "b", n=2, seed=10)
    orthanc.upload([*first, *second])
    credentials = pacs.Credentials(user=USER, password=PASSWORD)
    state = tmp_path / "state.json"
    settings = pacs.PacsSettings(url=orthanc.url, state=str(state), retries=2, backoff=0.05)
    options = {"credentials": credentials, "progress": False}
    detector = Detector.load(tiny_boxes_hf_dir, device="cpu", progress=False)
    with pytest.raises(pacs.PacsError) as caught:
        pacs.run(_StopsThePacs(detector, orthanc), settings, **options)
    message = str(caught.value)
    assert "unreachable" in message and f"127.0.0.1:{orthanc.port}" in message and "resume" in message
    assert PASSWORD not in message and "\n" not in message
    done = json.loads(state.read_text())["runs"]
    assert sum(len(run["studies"]) for run in done.values()) == 1  # the first study was recorded

    orthanc.start()  # same storage: the first study's SRs are there
    totals = pacs.run(detector, settings, **options)
    assert totals["studies"] == 1 and totals["srs"] == 2 and totals["skipped_studies"] == 1
    assert len(_srs(orthanc.url)) == 4
    assert orthanc.count() == 8 + len(_srs(orthanc.url, dicom_sr.SERIES_NUMBER_VIEWER_SR))


class _Answers503(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_pacs_answering_503_is_retried_with_backoff_then_reported(tiny_boxes_hf_dir, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(pacs.PacsError, match="HTTP 503 after 3 retries"):
            pacs.run(
                _FakeDetector(),
                pacs.PacsSettings(url=url, state=str(tmp_path / "s.json"), retries=3, backoff=0.01),
                progress=False,
            )
        assert _Answers503.hits == 4  # the first try and three retries
        # --watch waits an outage out instead of stopping (and says so).
        said: list[str] = []
        totals = pacs.run(
            _FakeDetector(),
            pacs.PacsSettings(url=url, state=str(tmp_path / "s.json"), retries=0, watch=True, interval=0.01),
            progress=False,
            max_polls=2,
            log=said.append,
        )
        assert totals["studies"] == 0 and len(said) == 2 and all("HTTP 503" in line for line in said)
    finally:
        server.shutdown()
        server.server_close()


class _FakeDetector:
    model_id = "fake"

    def detect(self, *args, **kwargs):  # never reached: the PACS answers nothing usable
        raise AssertionError("no study should have been found")


def test_credentials_come_from_env_or_file_and_never_show(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(pacs.ENV_TOKEN, raising=False)
    monkeypatch.setenv(pacs.ENV_USER, "alice")
    monkeypatch.setenv(pacs.ENV_PASSWORD, "hunter2")
    from_env = pacs.load_credentials()
    assert (from_env.user, from_env.password) == ("alice", "hunter2") and "hunter2" not in repr(from_env)
    secret = tmp_path / "pacs.json"
    secret.write_text(json.dumps({"token": "tok-123"}))
    assert pacs.load_credentials(secret).token == "tok-123"
    secret.write_text("{not json, password: hunter2")
    with pytest.raises(ConfigError) as caught:
        pacs.load_credentials(secret)
    assert "hunter2" not in str(caught.value) and "pacs.json" in str(caught.value)
    # A password in the URL is refused, and the message does not repeat it.
    code = main(["pacs", "--url", "http://bob:hunter2@pacs.local/dicom-web", "--model", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and "hunter2" not in err and "pacs.local" in err


def test_option_values_are_checked():
    assert pacs.parse_since("2026-01-05").isoformat() == "2026-01-05"
    assert pacs.parse_since("20260105").isoformat() == "2026-01-05"
    assert pacs.parse_modalities("cr, dx") == ("CR", "DX")
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        pacs.parse_since("last week")
    with pytest.raises(ConfigError, match="modality"):
        pacs.parse_modalities("CR;DROP")


def test_study_since_and_watch_select_what_is_processed(orthanc, tiny_boxes_hf_dir, tmp_path):
    import datetime

    from paligemma_xray.infer import Detector

    first, second = study(tmp_path / "a", n=1, seed=0), study(tmp_path / "b", n=1, seed=10)
    orthanc.upload(first)
    detector = Detector.load(tiny_boxes_hf_dir, device="cpu", progress=False)
    options = {"credentials": pacs.Credentials(user=USER, password=PASSWORD), "progress": False}

    def settings(state: str, **fields) -> pacs.PacsSettings:
        return pacs.PacsSettings(url=orthanc.url, state=str(tmp_path / state), **fields)

    later = datetime.date(2027, 1, 1)  # the studies are from 2026-01-05
    assert pacs.run(detector, settings("s1.json", since=later.isoformat()), **options)["srs"] == 0
    with pytest.raises(pacs.PacsError, match=r"no study 1\.2\.3\.4"):
        pacs.run(detector, settings("s2.json", studies=["1.2.3.4"]), **options)

    # --watch: a study that arrives between two polls is picked up by the second.
    def arrives(message: str) -> None:
        orthanc.upload(second)

    totals = pacs.run(
        detector, settings("s3.json", watch=True, interval=0.01), max_polls=2, log=arrives, **options
    )
    assert totals["studies"] == 2 and totals["srs"] == 2 and totals["skipped_studies"] == 1
    only = pydicom.dcmread(second[0]).StudyInstanceUID
    again = pacs.run(detector, settings("s4.json", studies=[only]), **options)
    assert again["studies"] == 1 and again["srs"] == 0 and again["skipped_images"] == 1
