"""Recipes: big-vision defaults, override order, YAML, flags, schedule."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest
import yaml

from paligemma_xray.errors import ConfigError
from paligemma_xray.train.recipes import (
    PRESETS,
    add_flags,
    field_docs,
    for_command,
    from_run,
    overrides,
    preset,
    resolve,
)

try:
    from paligemma_xray.train.loop import lr_factor
except ImportError:  # pragma: no cover - the loop imports torch
    lr_factor = None


def test_default_is_the_big_vision_recipe() -> None:
    config = resolve()
    assert config.recipe == "big-vision"
    assert config.trainable == "attention"
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 0.01, 0.0, 0.0)
    assert (config.schedule, config.warmup) == ("cosine", 0.1)
    assert (config.batch_size, config.examples, config.steps, config.max_length) == (8, 512, 64, 128)
    assert config.loss == "example"
    assert config.eval_interval == 8  # steps / 8
    assert (config.shuffle_objects, config.hflip, config.jitter) == (False, 0.0, 0.0)
    saved = yaml.safe_load(config.to_yaml())
    assert saved["recipe"] == "big-vision" and saved["lr"] == 0.01 and saved["trainable"] == "attention"


def test_every_field_is_documented() -> None:
    docs = field_docs()
    names = set(resolve().to_dict())
    assert names == set(docs), names ^ set(docs)
    assert all(len(text) > 5 for text in docs.values())


def test_override_order_preset_then_yaml_then_flags(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("recipe: lora\nlr: 0.001\nbatch_size: 4\nexamples: 40\n")
    config = resolve(config_file=path, overrides={"lr": 0.5, "hflip": None})
    assert config.recipe == "lora" and config.trainable == "lora"  # from the file's recipe
    assert config.batch_size == 4 and config.steps == 10  # from the file
    assert config.lr == 0.5  # the flag wins; None = flag not given
    assert resolve("full", path).recipe == "full"  # --recipe beats the file's recipe:


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lrr": 1}, "unknown config field.*lrr .did you mean lr"),
        ({"optimizer": "adam"}, "optimizer: input should be 'sgd' or 'adamw', got 'adam'"),
        ({"batch_size": 8, "grad_accum": 3}, "divisible"),
        ({"examples": 4}, "at least batch_size"),
        ({"activation_checkpointing": "yes"}, "activation_checkpointing: input should be a valid boolean"),
        ({"lr": True}, "lr: .*not true/false"),
        ({"quantize": "4bit"}, "needs trainable: lora"),
        # a zero/negative interval used to crash (modulo by zero) or silently mean "every step"
        ({"log_every": 0}, "log_every: input should be greater than or equal to 1, got 0"),
        ({"eval_batch_size": 0}, "eval_batch_size: .*greater than or equal to 1"),
        ({"eval_max_new_tokens": 0}, "eval_max_new_tokens: .*greater than or equal to 1"),
        ({"recipe": "lora", "lora_rank": 0}, "lora_rank: .*greater than or equal to 1"),
        ({"eval_every": -1}, "eval_every: .*greater than or equal to 0"),
        ({"checkpoint_every": -2}, "checkpoint_every: .*greater than or equal to 0"),
        ({"lora_dropout": 1.0}, "lora_dropout: input should be less than 1"),
        ({"adam_betas": [0.9]}, "adam_betas: .*at least 2 items"),
    ],
)
def test_bad_values_are_config_errors(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(overrides=values)


def test_yaml_mistakes_name_the_file_line_and_field(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("recipe: lora\nlr: 1e-3\noptimizer: adam\n")
    assert (
        resolve(overrides={"optimizer": "sgd"}, config_file=path).lr == 0.001
    )  # YAML 1.1 reads 1e-3 as text
    with pytest.raises(ConfigError) as caught:
        resolve(config_file=path)
    assert str(caught.value) == f"{path}:3: optimizer: input should be 'sgd' or 'adamw', got 'adam'"
    path.write_text("lr: 0.1\nbatch_size: 8\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: 'lr' is given twice"):
        resolve(config_file=path)
    path.write_text("lr: 0.1\nbatch_size: [8\n")
    with pytest.raises(ConfigError) as caught:
        resolve(config_file=path)
    message = str(caught.value)
    assert (
        message.startswith(f"{path}:3: not valid YAML") and "\n" not in message and "unicode" not in message
    )
    path.write_text("lr: 0.1\nbatch_size: 8\nexamples: 4\n")  # a mistake of two fields: the file is named
    with pytest.raises(ConfigError, match=r"r.yaml: examples \(4\) must be at least batch_size"):
        resolve(config_file=path)


def test_a_saved_run_config_is_a_recipe_file(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    saved = resolve("lora", overrides={"model": "m", "data": "d", "out": str(run), "lr": 0.003})
    (run / "config.yaml").write_text(saved.to_yaml())
    assert from_run(run) == saved
    # train --config RUN/config.yaml --out NEW: model and data come from the file
    again = for_command(None, run / "config.yaml", {"out": str(tmp_path / "new"), "model": None})
    assert (again.model, again.data, again.recipe, again.lr) == ("m", "d", "lora", 0.003)
    with pytest.raises(ConfigError, match="train needs --data, --out"):
        for_command(None, None, {"model": "m"})
    with pytest.raises(ConfigError, match="give no other flags"):
        for_command(None, None, {"lr": 0.1}, resume=run)


def test_unknown_recipe_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe"):
        preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(config_file=bad)
    with pytest.raises(ConfigError, match="not found"):
        resolve(config_file=tmp_path / "missing.yaml")


def test_flags_parse_into_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--lr", "0.02", "--no-cache-image-features", "--adam-betas", "0.8", "0.9"])
    assert overrides(args) == {"lr": 0.02, "cache_image_features": False, "adam_betas": [0.8, 0.9]}
    assert overrides(parser.parse_args([])) == {}


def test_presets_resolve() -> None:
    for name in PRESETS:
        assert resolve(name).recipe == name


def test_big_vision_schedule() -> None:
    config = resolve()
    lrs = [config.lr * lr_factor(config, s) for s in range(1, config.steps + 1)]
    # int(0.1 * 64) = 6 warm-up steps: 1/6, 2/6, … 1, then cosine to exactly 0 at the last step.
    assert lrs[0] == pytest.approx(0.01 / 6)
    assert lrs[5] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[6 + 29] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 30 / 58)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[5:]))
    constant = resolve(overrides={"schedule": "constant", "warmup": 0.0})
    assert {lr_factor(constant, s) for s in range(1, 65)} == {1.0}


def test_a_yaml_with_a_wrong_type_and_an_unknown_key_reports_both(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("recipe: lora\nbatch_size: eight\nlrr: 1e-3\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    message = str(info.value)  # used to name only the unknown key
    assert message.startswith(f"{path}:3: unknown config field(s): lrr (did you mean lr?)")
    assert "batch_size: input should be a valid integer" in message and "'eight'" in message
