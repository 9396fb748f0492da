"""Our KV-cached greedy loop against transformers' generate, and the box-or-stop rule."""

from __future__ import annotations

import math

import pytest
import torch

from paligemma_xray.infer.decode import BoxOrStop, _choose, greedy_decode
from paligemma_xray.model.processing import build_batch
from paligemma_xray.model.tiny import tiny_model

PROMPTS = ["detect fracture", "caption en", "answer en where is the break", "detect fracture ; cast"]


def sharp(version: int, seed: int):
    """A tiny model with large random weights: well-separated logits, so greedy choices do
    not hinge on float rounding, and varied outputs per image."""
    model, processor = tiny_model(version=version, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Small embeddings: Gemma scales them by sqrt(width), and large ones would make
            # every next token a copy of the last input one.
            std = 0.05 if "embed_tokens" in name else 0.3
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model, processor


def prompt_batch(processor, n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, 28, 28), generator=generator) * 2 - 1
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]  # mixed lengths: left padding varies
    return build_batch(processor, images, prompts)


def reference(model, batch, max_new_tokens, eos):
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("version", [1, 2])
def test_greedy_equals_generate_token_for_token(version):
    model, processor = sharp(version, seed=version)
    batch = prompt_batch(processor, n=6, seed=0)
    assert batch["attention_mask"].min() == 0  # the batch really is left-padded
    first = greedy_decode(model, batch, max_new_tokens=12, eos_token_id=10_000)  # never stops
    # Use as EOS a token that some rows produce mid-way and others never, so rows finish at
    # different steps and are dropped from the running batch.
    counts: dict[int, int] = {}
    for row in first.tokens:
        for token in set(row[1:8]) - {r[0] for r in first.tokens}:
            counts[token] = counts.get(token, 0) + 1
    eos = min(counts, key=lambda t: (abs(counts[t] - len(first.tokens) / 2), t))
    ours = greedy_decode(model, batch, max_new_tokens=12, eos_token_id=eos)
    theirs = reference(model, batch, 12, eos)
    assert ours.tokens == theirs
    assert 0 < sum(ours.finished) < len(ours.finished)
    assert len({len(row) for row in ours.tokens}) > 1
    # Log-probabilities are those of the chosen tokens under the model.
    with torch.no_grad():
        full = model(**batch, logits_to_keep=1).logits[:, -1].log_softmax(-1)
    for row, logps in enumerate(ours.logprobs):
        assert logps[0] == pytest.approx(float(full[row, ours.tokens[row][0]]), abs=1e-4)
        assert all(lp <= 0 for lp in logps)


def test_single_row_and_zero_tokens():
    model, processor = sharp(1, seed=3)
    batch = prompt_batch(processor, n=1, seed=1)
    assert greedy_decode(model, batch, max_new_tokens=0, eos_token_id=1).tokens == [[]]
    ours = greedy_decode(model, batch, max_new_tokens=5, eos_token_id=1)
    assert ours.tokens == reference(model, batch, 5, 1)


LOCS = torch.arange(100, 1124)  # location ids in a made-up 1200-token vocabulary
EOS = 1


def spread_logits(eos_prob: float, loc_mass: float, peak_bin: int = 300) -> torch.Tensor:
    """Logits where EOS has ``eos_prob`` and locations share ``loc_mass`` nearly evenly."""
    probs = torch.full((1200,), 1e-9)
    probs[EOS] = eos_prob
    locs = torch.full((1024,), 1.0)
    locs[peak_bin] = 1.5  # the best bin, still far below EOS on its own
    probs[LOCS] = locs / locs.sum() * loc_mass
    probs[2] = 1 - eos_prob - loc_mass
    return probs.log()[None]


def test_box_or_stop_takes_the_location_mass_over_eos():
    rule = BoxOrStop(loc_ids=LOCS, start_after=frozenset({5}))
    logits = spread_logits(eos_prob=0.3, loc_mass=0.65)
    greedy_token, _ = _choose(logits, None, None)
    assert int(greedy_token) == EOS  # the trap: EOS beats every single location token
    token, recorded = _choose(logits, rule, torch.tensor([0]))
    assert int(token) == 100 + 300  # the best bin
    assert float(recorded) == pytest.approx(math.log(0.65), abs=1e-4)  # "is there a box"
    # Inside a box (after its first location) the bin's own probability is recorded.
    token, recorded = _choose(logits, rule, torch.tensor([2]))
    assert int(token) == 400 and float(recorded) == pytest.approx(math.log(0.65 * 1.5 / 1024.5), abs=1e-4)
    # When stopping is more likely than any box, the rule stops too.
    token, recorded = _choose(spread_logits(eos_prob=0.6, loc_mass=0.35), rule, torch.tensor([0]))
    assert int(token) == EOS and float(recorded) == pytest.approx(math.log(0.6), abs=1e-4)
    # Outside box positions (-1) the rule does nothing.
    assert int(_choose(logits, rule, torch.tensor([-1]))[0]) == EOS


def test_min_box_probability_starts_a_box_below_eos_but_not_below_itself():
    logits = spread_logits(eos_prob=0.6, loc_mass=0.35)  # greedy and the plain rule stop here
    candidates = BoxOrStop(loc_ids=LOCS, min_box_probability=0.2)
    token, recorded = _choose(logits, candidates, torch.tensor([0]))
    assert int(token) == 400 and float(recorded) == pytest.approx(math.log(0.35), abs=1e-4)
    # Under the threshold it stops; and the threshold only concerns where a box may start.
    strict = BoxOrStop(loc_ids=LOCS, min_box_probability=0.5)
    assert int(_choose(logits, strict, torch.tensor([0]))[0]) == EOS
    assert int(_choose(logits, candidates, torch.tensor([-1]))[0]) == EOS
    with pytest.raises(ValueError, match="min_box_probability"):
        BoxOrStop(loc_ids=LOCS, min_box_probability=0.0)
