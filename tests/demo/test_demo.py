"""The embedded demo: shapes data, the shipped base model, pretraining and a shortened demo.

The full demo (``paligemma-xray demo``, about 10 minutes) is the README's first command,
not a test; here every phase runs on a few images and a few training steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open

from paligemma_xray.cli import main
from paligemma_xray.data import open_dataset
from paligemma_xray.demo import DemoSettings, PretrainSettings, pretrain, run_demo, shipped_base
from paligemma_xray.demo.base import (
    BASE_SIZES,
    MAX_BYTES,
    WarmupSettings,
    initial_model,
    patch_targets,
    warm_up_vision,
)
from paligemma_xray.demo.shapes import CLASSES, EVAL_SPLIT_SIZE, generate, make_example
from paligemma_xray.locations import classes_from_prefix, parse
from paligemma_xray.model import load


def test_shapes_are_deterministic_and_their_targets_parse():
    first, again, other = make_example(3, 7), make_example(3, 7), make_example(4, 7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert (first.prefix, first.suffix) == (again.prefix, again.suffix)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    kinds, empty = set(), 0
    for index in range(60):
        example = make_example(0, index)
        asked = classes_from_prefix(example.prefix)
        assert asked and set(asked) <= set(CLASSES)
        found = parse(example.suffix, example.image.size, asked)
        assert len(found) == len(example.labels)
        assert all(label in asked for label in example.labels)
        # Boxes survive the round trip through <loc> tokens to within one bin.
        np.testing.assert_allclose(found.xyxy, example.boxes, atol=example.image.size[0] / 1023 + 1e-3)
        kinds.update(example.labels)
        empty += not example.labels
    assert kinds == set(CLASSES)
    assert 0 < empty < 30  # "nothing here" is a common answer, not the usual one


def test_shapes_set_is_written_in_the_roboflow_layout(tmp_path):
    root = generate(tmp_path / "shapes", n=5, seed=1, progress=False)
    dataset = open_dataset(root)
    assert dataset.layout == "roboflow"
    sizes = [len(dataset.records(split)) for split in ("train", "valid", "test")]
    assert sizes == [5, EVAL_SPLIT_SIZE, EVAL_SPLIT_SIZE]
    assert dataset.records("train")[2].suffix == make_example(1, 2).suffix


def test_shipped_base_model_is_small_real_paligemma_and_float16():
    path = shipped_base()
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes == {"F16"}
    model, processor = load(path, dtype="float32", progress=False)
    assert type(model).__name__ == "PaliGemmaForConditionalGeneration"
    assert model.config.vision_config.image_size == BASE_SIZES["image_size"]
    tokenizer = processor.tokenizer
    loc = tokenizer.convert_tokens_to_ids("<loc0512>")
    assert tokenizer.encode("<loc0512>", add_special_tokens=False) == [loc]
    # How the shipped file was made is recorded beside it.
    record = json.loads((path / "pretrain.json").read_text())
    assert record["settings"] == asdict(PretrainSettings())  # the defaults of `demo pretrain`
    settings = record["settings"]
    assert record["valid"]["step"] == settings["examples"] // settings["batch_size"]


def test_initialisation_gives_neighbouring_location_bins_similar_embeddings():
    model, processor = initial_model(seed=0)
    first = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    loc = model.get_input_embeddings().weight[first : first + 1024].detach()
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert cosine(loc[500], loc[501]) > 0.9
    assert cosine(loc[500], loc[501]) > cosine(loc[500], loc[900]) + 0.5


def test_patch_targets_mark_the_patches_each_object_covers():
    # 4×4 patches of 28 px on a 112-px image; centres at 14, 42, 70, 98.
    scene = [
        ("square", (30.0, 30.0, 80.0, 60.0)),  # covers centres x 42, 70 and y 42
        ("circle", (0.0, 90.0, 8.0, 100.0)),  # too small for any centre: its own centre's patch
        ("ring", (60.0, 30.0, 75.0, 50.0)),  # overlaps the square at (row 1, col 2); smaller, wins
    ]
    classes, boxes = patch_targets(scene, image_size=112, grid=4)
    background = len(CLASSES)
    grid = classes.reshape(4, 4)
    assert grid[1, 1] == CLASSES.index("square")
    assert grid[1, 2] == CLASSES.index("ring")
    assert grid[3, 0] == CLASSES.index("circle")
    assert int((classes != background).sum()) == 3
    # Boxes in fractional <loc> bins, PaliGemma order y1 x1 y2 x2.
    np.testing.assert_allclose(boxes[1 * 4 + 1].numpy(), np.array([30, 30, 60, 80]) / 112 * 1023, rtol=1e-6)


def test_vision_warm_up_trains_only_the_vision_side():
    model, processor = initial_model(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    warm_up_vision(model, processor, WarmupSettings(steps=4, batch_size=4, images=8), seed=0, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("vision_tower" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    vision_side = ("vision_tower", "multi_modal_projector", "embed_tokens")
    assert changed <= {n for n in before if any(part in n for part in vision_side)}
    assert all(p.requires_grad for p in model.parameters())  # handed back as it came


@pytest.mark.slow
def test_pretrain_writes_a_loadable_float16_base(tmp_path):
    settings = PretrainSettings(train_images=16, examples=64, batch_size=8, evaluations=1)
    settings.warmup_stage = WarmupSettings(steps=3, batch_size=4, images=16)
    summary = pretrain(tmp_path / "base", settings, progress=False)
    assert summary.bytes <= MAX_BYTES
    assert summary.valid["kind"] == "eval" and "val_loss" in summary.valid
    model, _ = load(tmp_path / "base", progress=False)
    assert str(model.dtype) == "torch.float16"
    # Same settings, same weights: the shipped file is reproducible by its command.
    pretrain(tmp_path / "again", settings, progress=False)
    weights = "model.safetensors"
    assert (tmp_path / "base" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path):
    # One thread: the suite runs two workers on two cores.
    settings = DemoSettings(
        train_images=16, valid_images=4, test_images=6, image_size=112, examples=32, threads=1
    )
    from paligemma_xray.demo.run import CPU_KERNELS

    threads, kernels = torch.get_num_threads(), {name: os.environ.get(name) for name in CPU_KERNELS}
    result = run_demo(tmp_path / "demo", settings, progress=False, bootstrap=0)
    # What the figures depend on is recorded; the process is left as it was found.
    assert torch.get_num_threads() == threads
    assert {name: os.environ.get(name) for name in CPU_KERNELS} == kernels
    assert result["runtime"]["threads"] == 1 and result["runtime"]["torch"] == torch.__version__
    assert result["runtime"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    out = tmp_path / "demo"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for phase in ("before", "after"):
        figures = saved[phase]
        assert set(figures) >= {"map50", "map50_95", "precision", "recall", "froc_score", "n_images"}
        assert figures["n_images"] == 6
        assert figures["map50"] is None or 0.0 <= figures["map50"] <= 1.0
    assert saved["train"]["examples"] == 32 and saved["train"]["steps"] == 32 // saved["recipe"]["batch_size"]
    assert saved["recipe"]["name"] == settings.recipe
    report = (out / "report.html").read_text()
    assert "before" in report and "after" in report
    assert (out / "model" / "config.json").is_file() and (out / "model.npz").is_file()
    # The operating point chosen on valid travels with the model (predict / serve use it).
    saved_point = json.loads((out / "model" / "calibration.json").read_text())
    assert saved_point["operating_point"] == "f1"
    if saved_point["threshold"] is not None:  # None: no true positive on this tiny valid split
        assert saved_point["threshold"] == saved["after"]["threshold"]
    assert (out / "model.calibration.json").is_file()
    # The .npz reloads with the tokenizer written beside it, as big_vision keeps them.
    model, _ = load(out / "model.npz", progress=False)
    assert model.config.vision_config.image_size == BASE_SIZES["image_size"]
    # Deterministic for a given seed: a second run trains and scores identically.
    again = run_demo(tmp_path / "again", settings, progress=False, bootstrap=0)
    assert again["train"]["final_loss"] == result["train"]["final_loss"]
    assert again["after"] == result["after"] and again["before"] == result["before"]


def test_demo_budget_too_small_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "--minutes", "1"]) == 2
    assert "leaves no time to train" in capsys.readouterr().err


def test_the_demo_pins_the_cpu_kernels_while_it_runs_and_only_then(monkeypatch):
    from paligemma_xray.demo.run import CPU_KERNELS, _has_avx2, pinned_cpu_kernels

    for name in CPU_KERNELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a value the user set wins
    with pinned_cpu_kernels():
        inside = {name: os.environ.get(name) for name in CPU_KERNELS}
    if _has_avx2():
        assert inside == {
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_CBWR": "COMPATIBLE",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
        }
    else:  # not x86 with AVX2: nothing to pin
        assert inside == {"ATEN_CPU_CAPABILITY": None, "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": None}
    assert {name: os.environ.get(name) for name in CPU_KERNELS} == {
        "ATEN_CPU_CAPABILITY": None, "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": None
    }  # fmt: skip
