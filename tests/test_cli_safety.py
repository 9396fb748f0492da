"""Nothing lost, nothing silently wrong: the command line's writing verbs under misuse.

Each test is a case that lost data, mixed two results or ended in a traceback before
(issue 17): writing over an earlier output, name collisions, stale resumes, a full disk,
a file that is not a checkpoint, checks that came after minutes of work.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_xray.cli import main


def annotations(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "dataset").glob("_annotations.*.jsonl"))}


def one_line_error(err: str, *needles: str) -> None:
    """The CLI said what went wrong in one line, without a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(match, room)``: files whose name contains ``match`` hold ``room`` bytes, then ENOSPC.

    Patches ``open`` (builtins and io, which pathlib and PIL use): the writer gets as far as a
    real full disk lets it, leaving a truncated file behind unless it wrote to a temporary name.
    """
    real_open = io.open

    def install(match: str, room: int = 100) -> None:
        class Full:
            def __init__(self, handle):
                self._handle = handle
                self._written = 0

            def write(self, data):
                left = room - self._written
                if len(data) > left:
                    self._handle.write(data[: max(left, 0)])
                    self._handle.flush()
                    self._written = room
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self._written += len(data)
                return self._handle.write(data)

            def __getattr__(self, name):
                return getattr(self._handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._handle.__exit__(*exc)

        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writing = any(flag in mode for flag in "wax+")
            return Full(handle) if writing and match in os.fspath(file) else handle

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return install


# --- 1. writing verbs refuse a non-empty target ---------------------------------------------


def test_synth_into_an_existing_set_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["data", "synth", str(out), "--n", "6", "--size", "64", "--no-progress"]) == 0
    before = annotations(out)
    images_before = sorted(p.name for p in (out / "dataset").glob("*.jpg"))

    assert main(["data", "synth", str(out), "--n", "3", "--size", "64", "--seed", "1"]) == 2
    one_line_error(capsys.readouterr().err, "--overwrite", "dataset")
    assert annotations(out) == before  # used to become 3/0/0 records with exit 0

    assert main(["data", "synth", str(out), "--n", "3", "--size", "64", "--seed", "1", "--overwrite"]) == 0
    images = sorted(p.name for p in (out / "dataset").glob("*.jpg"))
    listed = [json.loads(line)["image"] for text in annotations(out).values() for line in text.splitlines()]
    assert sorted(listed) == images and len(images) == 3  # no image of the old set left unannotated
    assert not set(images) & set(images_before)


def test_import_into_an_existing_set_keeps_no_split_of_the_old_one(tmp_path, capsys):
    coco = tmp_path / "coco"
    coco.mkdir()
    Image.new("RGB", (40, 30)).save(coco / "a.jpg")
    (coco / "_annotations.coco.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [1, 1, 10, 10],
                        "area": 100,
                        "iscrowd": 0,
                    }
                ],
                "categories": [{"id": 1, "name": "fracture"}],
            }
        )
    )
    out = tmp_path / "set"
    assert main(["data", "synth", str(out), "--n", "8", "--size", "64", "--no-progress"]) == 0
    assert "_annotations.test.jsonl" in annotations(out)

    assert main(["data", "import", "--format", "coco", str(coco), str(out), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "--overwrite")
    assert (
        main(["data", "import", "--format", "coco", str(coco), str(out), "--overwrite", "--no-progress"]) == 0
    )
    assert list(annotations(out)) == ["_annotations.train.jsonl"]  # the old test split is gone
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["_annotations.train.jsonl", "a.jpg"]


def test_demo_over_an_earlier_demo_and_with_a_bad_base_fails_at_once(tmp_path, capsys):
    earlier = tmp_path / "demo"
    (earlier / "model").mkdir(parents=True)
    (earlier / "model" / "config.json").write_text("{}")
    assert main(["demo", "--out", str(earlier)]) == 2
    one_line_error(capsys.readouterr().err, "--overwrite")
    assert (earlier / "model" / "config.json").read_text() == "{}"

    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    assert main(["demo", "--out", str(tmp_path / "fresh"), "--base", str(tmp_path / "x.jpg")]) == 2
    one_line_error(capsys.readouterr().err, "x.jpg", "JPEG image")  # used to fail after writing images
    assert not (tmp_path / "fresh").exists()


# --- 2, 3. predict: collision-free names, a manifest, no stale resume --------------------------


@pytest.fixture
def same_names(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "x.png"
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_keeps_same_named_images_apart(tiny_boxes_hf_dir, same_names, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "predict",
        "--model",
        str(tiny_boxes_hf_dir),
        *map(str, same_names),
        str(same_names[0]),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "predicted 2 image(s)" in err and "1 given twice" in err
    records = [json.loads((out / "json" / name).read_text()) for name in ("a/x.png.json", "b/x.png.json")]
    assert [r["image"] for r in records] == [str(p) for p in same_names]
    assert (out / "annotated" / "a" / "x.png.png").is_file() and (
        out / "annotated" / "b" / "x.png.png"
    ).is_file()
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images] == ["a/x.png", "b/x.png"]  # used to list x.jpg twice
    results = json.loads((out / "predictions.coco.json").read_text())
    per_image = {i["id"]: len(r["detections"]["detections"]) for i, r in zip(images, records)}
    assert {i: sum(r["image_id"] == i for r in results) for i in per_image} == per_image


def test_predict_resume_with_other_settings_is_refused(
    tiny_boxes_hf_dir, tiny_hf_dir, same_names, tmp_path, capsys
):
    out = tmp_path / "out"
    base = ["predict", *map(str, same_names), "--out", str(out), "--no-progress", "--max-new-tokens", "8"]
    assert main([*base, "--model", str(tiny_boxes_hf_dir)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["prompt"] == "detect fracture" and manifest["model_checksum"]["sha256"]
    capsys.readouterr()

    assert main([*base, "--model", str(tiny_boxes_hf_dir)]) == 2  # a second run over the results
    one_line_error(capsys.readouterr().err, "--resume", "--overwrite")
    assert main([*base, "--model", str(tiny_boxes_hf_dir), "--resume", "--prompt", "detect crack"]) == 2
    one_line_error(capsys.readouterr().err, "prompt 'detect fracture' then, 'detect crack' now")
    assert main([*base, "--model", str(tiny_hf_dir), "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "model weights")
    assert json.loads((out / "categories.json").read_text()) == [{"id": 1, "name": "fracture"}]

    assert main([*base, "--model", str(tiny_boxes_hf_dir), "--resume"]) == 0  # same settings: fine
    assert "2 done before (--resume)" in capsys.readouterr().err
    assert main([*base, "--model", str(tiny_hf_dir), "--overwrite", "--prompt", "detect crack"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["prompt"] == "detect crack"


# --- 4. a full disk: one line, nothing truncated under a final name ---------------------------


def test_predict_on_a_full_disk_leaves_no_truncated_png(
    tiny_boxes_hf_dir, same_names, tmp_path, capsys, full_disk
):
    out = tmp_path / "out"
    full_disk(".png.png", room=100)
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_boxes_hf_dir),
                str(same_names[0]),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys.readouterr().err, "no space left", "x.png.png")
    assert not (out / "annotated" / "x.png.png").exists()
    assert not (out / "json" / "x.png.json").exists()  # so a --resume does it again
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_evaluate_on_a_full_disk_leaves_no_truncated_report(
    tiny_boxes_hf_dir, synthetic_dataset, tmp_path, capsys, full_disk
):
    out = tmp_path / "eval"
    full_disk("report.html", room=1000)
    args = [
        "evaluate",
        "--model",
        str(tiny_boxes_hf_dir),
        "--data",
        str(synthetic_dataset),
        "--out",
        str(out),
        "--bootstrap",
        "0",
        "--max-new-tokens",
        "8",
        "--no-progress",
    ]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "no space left", "report.html")
    assert not (out / "report.html").exists()  # used to be a truncated page under the final name
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"


def test_convert_on_a_full_disk_leaves_no_folder_of_config_files(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(modeling_utils, "safe_save_file", no_space)
    out = tmp_path / "hf"
    assert main(["convert", str(tiny_hf_dir), str(out), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "no space left", str(out))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_synth_on_a_full_disk_is_one_line_and_leaves_no_set(tmp_path, capsys, full_disk):
    full_disk("xray_0_00002", room=10)
    assert main(["data", "synth", str(tmp_path / "set"), "--n", "5", "--size", "64", "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "no space left")
    assert not (tmp_path / "set" / "dataset").exists()


def test_convert_refuses_an_existing_output(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_hf_dir), str(out)]) == 2
    one_line_error(capsys.readouterr().err, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_saved_model_files_have_the_usual_modes(tiny_hf_dir, tmp_path):
    assert main(["convert", str(tiny_hf_dir), str(tmp_path / "hf"), "--no-progress"]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # safetensors wrote 0600


# --- 6, 7. files that are not what they should be: one line naming them -----------------------


def test_model_that_is_not_a_checkpoint_says_what_it_is(tiny_hf_dir, same_names, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    lone = tmp_path / "model.safetensors"
    lone.write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    for model, what in ((tmp_path / "x.jpg", "JPEG image"), (lone, "lone safetensors")):
        assert main(["predict", "--model", str(model), str(same_names[0]), "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys.readouterr().err, str(model), what)  # was "no tokenizer given"


def test_truncated_safetensors_is_one_line(tiny_hf_dir, same_names, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["predict", "--model", str(broken), str(same_names[0]), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "broken", "cannot load the HF model")


@pytest.mark.parametrize(("device", "message"), [("foo", "unknown device 'foo'"), ("cuda:7", "cuda:7")])
def test_bad_device_is_one_line(tiny_hf_dir, same_names, tmp_path, capsys, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_hf_dir),
                str(same_names[0]),
                "--out",
                str(tmp_path / "o"),
                "--device",
                device,
            ]
        )
        == 2
    )
    one_line_error(capsys.readouterr().err, message)


# --- 10. inputs are checked before the model loads ---------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    from paligemma_xray.infer import Detector

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(Detector, "load", refuse)


def test_evaluate_checks_compare_paths_and_numbers_first(
    tiny_hf_dir, synthetic_dataset, tmp_path, capsys, no_model_load
):
    base = [
        "evaluate",
        "--model",
        str(tiny_hf_dir),
        "--data",
        str(synthetic_dataset),
        "--out",
        str(tmp_path / "e"),
    ]
    for flags, needle in (
        (["--compare", str(tmp_path / "missing")], "no metrics file"),
        (["--threshold", "2"], "threshold"),
        (["--split", "valid", "--data", str(tmp_path / "nowhere")], "nowhere"),
        (["--max-bad-records", "-1"], "--max-bad-records"),
    ):
        assert main([*base, *flags]) == 2
        one_line_error(capsys.readouterr().err, needle)


def test_predict_checks_paths_and_threshold_first(tiny_hf_dir, tmp_path, capsys, no_model_load):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    base = ["predict", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "o")]
    assert main([*base, str(tmp_path / "missing.png")]) == 2
    one_line_error(capsys.readouterr().err, "missing.png")
    assert main([*base, str(tmp_path / "x.png"), "--threshold", "2"]) == 2
    one_line_error(capsys.readouterr().err, "threshold")


# --- 12. noise ---------------------------------------------------------------------------------


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--model" in err and "usage:" not in err


def test_every_verb_help_ends_with_examples_and_has_no_markup(capsys):
    import argparse

    from paligemma_xray.cli import build_parser

    def leaves(parser, prefix=()):  # every verb that runs (a group such as `data` lists sub-verbs)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found = [] if subs and not parser.get_default("handler") else [list(prefix)]
        for action in subs:
            for name, sub in action.choices.items():
                found.extend(leaves(sub, (*prefix, name)))
        return found

    verbs = [verb for verb in leaves(build_parser()) if verb]
    assert ["pacs"] in verbs and ["data", "download"] in verbs and ["demo"] in verbs
    for verb in verbs:
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        text = capsys.readouterr().out
        examples = text.split("\nexamples:\n", 1)
        assert len(examples) == 2 and examples[1].startswith("  ") and "paligemma-xray" in examples[1], verb
        assert "``" not in text and ":func:" not in text, verb
        if verb != ["train"]:  # train's --no-progress is its recipe's progress field
            assert "--no-progress" in text, verb
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "DEMO_VERB" not in usage and "[pretrain]" in usage  # the sub-verb is optional


def test_interrupted_training_names_the_last_checkpoint_and_the_resume_command(tmp_path):
    from paligemma_xray.train.logs import last_record, read_metrics
    from paligemma_xray.train.run_folder import interrupted_message

    run = tmp_path / "run"
    assert "nothing to resume" in interrupted_message(run)
    run.mkdir()
    (run / "config.yaml").write_text("recipe: lora\n")  # stopped before its first checkpoint
    assert f"Start it again with: paligemma-xray train --resume {run}" in interrupted_message(run)
    for step in (2, 10):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
    message = interrupted_message(run)
    assert "step 10" in message and f"paligemma-xray train --resume {run}" in message
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 9, "loss": 0.5}\n'
        '{"kind": "train", "step": 10, "loss": 0.25}\n{"kind": "eval"}\n'
    )
    # a finished run's resume used to print "final loss n/a"
    assert last_record(read_metrics(run), "train")["loss"] == 0.25
