"""Typed verb settings: one declaration gives the --config YAML keys, the flags and the checks.

Exercised through the real verbs' settings classes and parsers (predict, evaluate, serve,
pacs): values resolve as defaults < --config file < flags, and every mistake is one line
naming the flag, or the file and line.
"""

from __future__ import annotations

import pytest

from paligemma_xray import settings as typed
from paligemma_xray.cli import build_parser, main
from paligemma_xray.errors import ConfigError
from paligemma_xray.evaluate.settings import EvaluateSettings
from paligemma_xray.infer.settings import DetectSettings, PredictSettings
from paligemma_xray.locations import DEFAULT_PROMPT
from paligemma_xray.pacs.settings import PacsSettings
from paligemma_xray.serve.settings import ServeSettings


def _settings(argv: list[str]):
    """What main() hands the verb's handler, without running it."""
    args = build_parser().parse_args(argv)
    return typed.from_args(args.settings_class, args, config_file=args.config, parser=args.verb_parser)


def test_config_file_gives_values_and_flags_override_it(tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("model: runs/r1\nout: preds\nthreshold: 0.3\ntta: [hflip]\nimages: false\n")
    got = _settings(["predict", "--config", str(config), "x.png", "--threshold", "0.5"])
    assert isinstance(got, PredictSettings)
    assert got.model == ["runs/r1"] and got.out == "preds" and got.paths == ["x.png"]
    assert got.threshold == 0.5  # the flag wins over the file
    assert got.tta == ["hflip"] and got.images is False and got.fused
    assert got.prompt == DEFAULT_PROMPT and got.batch_size == 8  # the declared defaults


def test_flags_keep_their_names_and_defaults():
    got = _settings(["evaluate", "--model", "a", "--model", "b", "--data", "d", "--out", "o", "--iou", "0.1",
                     "--calibration", "isotonic", "--no-save-calibration", "--plain-greedy"])  # fmt: skip
    assert isinstance(got, EvaluateSettings)
    assert got.model == ["a", "b"] and got.iou_threshold == 0.1 and got.calibration_method == "isotonic"
    assert got.save_calibration is False and got.box_or_stop is False and got.split == "test"
    assert got.bootstrap == 1000 and got.max_bad_records == 10 and got.calibration_owner() is None
    pacs = _settings(["pacs", "--url", "http://pacs:8042/dicom-web", "--model", "m", "--study", "1.2",
                      "--study", "1.3", "--backoff", "0.5", "--modality", "cr"])  # fmt: skip
    assert isinstance(pacs, PacsSettings)
    assert pacs.studies == ["1.2", "1.3"] and pacs.backoff == 0.5 and pacs.modalities == ("CR",)
    assert pacs.state == "pacs-state.json" and pacs.retries == 5 and pacs.timeout == 60.0


def test_a_settings_file_written_back_reads_the_same(tmp_path):
    given = ServeSettings(model=["runs/r1"], port=9000, max_batch=4, min_box_probability=0.05)
    (tmp_path / "serve.yaml").write_text(typed.to_yaml(given))
    assert _settings(["serve", "--config", str(tmp_path / "serve.yaml")]) == given


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("model: m\nout: o\nbatch_size: 0\n", 3, "batch size must be at least 1"),  # the library's check
        ("model: m\nbatch_size: '8'\n", 2, "batch_size: input should be a valid integer"),  # strict types
        ("model: m\n\nthreshhold: 0.5\n", 3, "unknown config field(s): threshhold (did you mean threshold?)"),
        ("model: m\nmodel: n\n", 2, "'model' is given twice"),
        ("model: [m\n", 2, "not valid YAML"),
        ("model: m\nfusion: mean\n", 2, "fusion: input should be 'wbf' or 'nms'"),
    ],
)
def test_a_mistake_in_the_file_is_one_line_naming_file_and_line(tmp_path, capsys, text, line, words):
    config = tmp_path / "predict.yaml"
    config.write_text(text)
    assert main(["predict", "--config", str(config), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}:{line}: ") and words in err and err.count("\n") == 1, err


def test_a_bad_flag_is_named_as_the_user_typed_it(capsys):
    assert main(["evaluate", "--model", "m", "--data", "d", "--out", "o", "--iou", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --iou: input should be a finite number") and err.count("\n") == 1, err
    assert main(["predict", "--model", "m", "x.png", "--min-box-probability", "0"]) == 2
    assert capsys.readouterr().err == "error: min_box_probability is a probability in (0, 1], got 0.0\n"


def test_a_required_value_missing_from_flags_and_file_is_argparses_one_line(tmp_path, capsys):
    config = tmp_path / "evaluate.yaml"
    config.write_text("data: my-set\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(config)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "required: --model, --out" in err and "usage:" not in err


def test_library_callers_get_the_same_checks():
    with pytest.raises(ConfigError, match="threshold is a score between 0 and 1"):
        DetectSettings(model=["m"], threshold=2.0)
    with pytest.raises(ConfigError, match=r"--resume .* --overwrite"):
        PredictSettings(model=["m"], paths=["x"], resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="serve takes one --model"):
        ServeSettings(model=["a", "b"])
    with pytest.raises(ConfigError, match="out of range"):
        ServeSettings(model=["a"], queue=0)
    settings = PredictSettings(model=["m"], paths=["x"])
    with pytest.raises(ConfigError, match="bootstrap is a number of resamples"):
        EvaluateSettings(model=["m"], bootstrap=-1)
    settings.threshold = 0.4  # checked on assignment too
    with pytest.raises(ConfigError, match="threshold"):
        settings.threshold = 4.0


def test_every_settings_field_has_help():
    for cls in (PredictSettings, EvaluateSettings, ServeSettings, PacsSettings):
        assert all(typed.field_docs(cls).values()), cls


def test_every_verb_takes_a_config_file(capsys):
    import argparse

    def leaves(parser, prefix=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found = [] if subs and not parser.get_default("handler") else [list(prefix)]
        for action in subs:
            for name, sub in action.choices.items():
                found.extend(leaves(sub, (*prefix, name)))
        return found

    for verb in [v for v in leaves(build_parser()) if v]:
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        assert "--config FILE" in capsys.readouterr().out, verb
