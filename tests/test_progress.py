"""The progress policy: bars on a terminal, plain periodic lines elsewhere, off on request."""

from __future__ import annotations

import io
import subprocess
import sys

from paligemma_xray import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_plain_lines(monkeypatch):
    """A redrawn bar written to a log used to be one line of thousands of characters."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress.bar(range(500), desc="predict", unit="img", mininterval=0, miniters=1):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) > 2 and all(len(line) <= 100 for line in lines)
    assert lines[-1].startswith("predict: 100%")


def test_on_a_terminal_it_is_tqdm_redrawing_in_place(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    for _ in progress.bar(range(3), desc="work", mininterval=0):
        pass
    assert "\r" in screen.getvalue()


def test_no_progress_silences_every_bar(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "_state", {"enabled": True})
    progress.set_enabled(False)
    for _ in progress.bar(range(3), desc="work"):
        pass
    assert log.getvalue() == "" and not progress.is_enabled(True)
    progress.set_enabled(True)
    for _ in progress.bar(range(3), desc="work", enabled=False):
        pass
    assert log.getvalue() == ""


def test_cli_no_progress_and_no_opencv_warning(tmp_path):
    """`data synth --no-progress` prints its one line; drawing boxes no longer warns about OpenCV."""
    code = (
        "import sys; from paligemma_xray.cli import main; "
        "from paligemma_xray.infer.predict import annotate; "
        "from paligemma_xray.locations import Detections; from PIL import Image; "
        "annotate(Image.new('RGB', (8, 8)), Detections.empty((8, 8))); "
        f"sys.exit(main(['data', 'synth', {str(tmp_path / 's')!r}, '--n', '2', '--size', '64', "
        "'--no-progress']))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "OpenCV" not in done.stderr and "synth" not in done.stderr, done.stderr


def test_cli_no_progress_lasts_one_command(tmp_path):
    from paligemma_xray.cli import main

    assert progress.is_enabled()
    assert main(["data", "synth", str(tmp_path / "s"), "--n", "2", "--size", "64", "--no-progress"]) == 0
    assert progress.is_enabled()  # main() called in-process leaves the switch as it found it
