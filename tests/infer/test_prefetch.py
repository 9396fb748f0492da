"""The off-thread loader behind ``predict``: order, errors, bounded look-ahead, same outputs."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.errors import ImageLoadError
from paligemma_xray.infer.prefetch import Prefetch


def test_results_come_back_in_input_order_whatever_finishes_first():
    # Later items finish first: the order must still be the input order.
    def load(i: int) -> int:
        time.sleep(0.002 * (6 - i))
        return i * 10

    assert list(Prefetch(range(6), load, workers=3)) == [(i, i * 10) for i in range(6)]
    assert list(Prefetch(range(6), load, workers=0)) == [(i, i * 10) for i in range(6)]


def test_loading_runs_off_the_consumer_thread_only_with_workers():
    def load(_: int) -> str:
        return threading.current_thread().name

    assert {name for _, name in Prefetch(range(4), load, workers=2)} <= {f"prefetch_{i}" for i in range(2)}
    assert {name for _, name in Prefetch(range(4), load, workers=0)} == {threading.current_thread().name}


def test_an_error_is_raised_at_its_item_after_the_items_before_it():
    def load(i: int) -> int:
        if i == 3:
            raise ImageLoadError("cannot decode", path=f"img{i}.png")
        return i

    seen = []
    with pytest.raises(ImageLoadError, match=r"img3\.png"):
        for item, _ in Prefetch(range(10), load, workers=2):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_the_source_is_read_at_most_ahead_items_in_advance():
    read = []

    def source():
        for i in range(100):
            read.append(i)
            yield i

    loader = iter(Prefetch(source(), lambda i: i, workers=2, ahead=4))
    for _ in range(3):
        next(loader)
    assert len(read) <= 3 + 4  # consumed + in flight: a folder walk stays a stream
    loader.close()  # an early stop shuts the threads down
    assert len(read) < 100


def test_negative_workers_are_a_user_error_of_the_cli(tiny_hf_dir, tmp_path, capsys):
    from paligemma_xray.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    args = ["predict", "--model", str(tiny_hf_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    assert main([*args, "--workers", "-1"]) == 2
    err = capsys.readouterr().err
    assert "workers must be at least 0" in err and "Traceback" not in err


def test_predict_writes_the_same_files_with_and_without_loading_threads(tiny_hf_dir, tmp_path):
    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.predict import predict
    from paligemma_xray.infer.settings import PredictSettings

    folder = tmp_path / "xrays"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    detector = Detector.load(tiny_hf_dir, device="cpu", progress=False)
    outputs = {}
    for workers in (0, 3):
        out = tmp_path / f"out{workers}"
        settings = PredictSettings(
            paths=[str(folder)], out=str(out), batch_size=2, max_new_tokens=6, workers=workers, images=False
        )
        summary = predict(detector, settings, progress=False)
        assert summary["predicted"] == 5 and summary["input_wait_s"] >= 0
        outputs[workers] = {p.name: json.loads(p.read_text()) for p in sorted((out / "json").rglob("*.json"))}
    assert outputs[0] == outputs[3] and len(outputs[0]) == 5


def test_predict_reports_an_undecodable_image_by_name_with_loading_threads(tiny_hf_dir, tmp_path):
    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.predict import predict
    from paligemma_xray.infer.settings import PredictSettings

    folder = tmp_path / "xrays"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    detector = Detector.load(tiny_hf_dir, device="cpu", progress=False)
    with pytest.raises(ImageLoadError, match=r"b\.png"):
        settings = PredictSettings(
            paths=[str(folder)], out=str(tmp_path / "out"), max_new_tokens=4, workers=2
        )
        predict(detector, settings, progress=False)


def test_background_writes_everything_and_raises_the_first_error_on_the_callers_thread(tmp_path):
    from paligemma_xray.infer.prefetch import Background

    with Background(workers=2, pending=2) as writer:
        for i in range(6):
            writer.submit((tmp_path / f"{i}.txt").write_text, str(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.txt" for i in range(6)]

    def fail(i: int) -> None:
        if i == 2:
            raise OSError(f"disk full writing {i}")

    with pytest.raises(OSError, match="disk full writing 2"), Background(workers=2) as writer:
        for i in range(4):
            writer.submit(fail, i)


def test_background_bounds_the_tasks_in_flight():
    from paligemma_xray.infer.prefetch import Background

    release = threading.Event()
    started = []

    def task(i: int) -> None:
        started.append(i)
        release.wait(5)

    writer = Background(workers=1, pending=2)
    writer.submit(task, 0)
    writer.submit(task, 1)
    blocked = threading.Thread(target=writer.submit, args=(task, 2))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a third task waits: memory stays bounded
    release.set()
    blocked.join(5)
    writer.close()
    assert started == [0, 1, 2] and writer.wait_s > 0
