"""The rule that picks best/, and the state a checkpoint carries."""

from __future__ import annotations

import math

from paligemma_xray.train.state import TrainState


def test_higher_map_wins_and_ties_go_to_the_lower_loss() -> None:
    state = TrainState()
    assert state.improves({"val_loss": 3.0, "map50": 0.0})
    state.record_best({"val_loss": 3.0, "map50": 0.0}, step=2)
    assert (state.best_metric, state.best_value, state.best_step) == ("map50", 0.0, 2)
    assert state.improves({"val_loss": 2.0, "map50": 0.0})  # untrained mAP 0: loss breaks the tie
    assert not state.improves({"val_loss": 4.0, "map50": 0.0})
    assert state.improves({"val_loss": 9.0, "map50": 0.1})  # mAP first, whatever the loss
    assert not state.improves({"val_loss": 0.1, "map50": math.nan})


def test_without_map_lower_loss_wins() -> None:
    state = TrainState()
    state.record_best({"val_loss": 2.0}, step=1)
    assert state.best_metric == "val_loss" and state.best_value == 2.0
    assert state.improves({"val_loss": 1.5}) and not state.improves({"val_loss": 2.5})


def test_state_json_round_trip_ignores_other_keys() -> None:
    state = TrainState(step=7, best_metric="map50", best_value=0.25, best_step=6, best_val_loss=1.0)
    assert TrainState.from_json({**state.to_json(), "scheduler": {"last_epoch": 7}}) == state
    # A checkpoint written before best_val_loss existed still loads.
    assert TrainState.from_json({"step": 3, "best_value": None, "best_step": None}).step == 3


def test_a_resume_under_other_runtime_values_is_named_in_one_line() -> None:
    started = {"torch": "2.13.0", "threads": 1, "device": "cpu", "processes": 1}
    state = TrainState.from_json(TrainState(step=3, runtime=dict(started)).to_json())
    assert state.runtime == started
    assert state.resumed_under(dict(started)) is None and not state.runtime_changed
    line = state.resumed_under({**started, "threads": 2})
    assert line is not None and "\n" not in line
    assert "threads 2 (the run started with 1)" in line and "last bits" in line
    assert state.runtime_changed and state.runtime == started  # what the run started under stays
    # A checkpoint written before runtimes were recorded: nothing to compare, nothing claimed.
    old = TrainState.from_json({"step": 3})
    assert old.resumed_under(started) is None and old.runtime == started
