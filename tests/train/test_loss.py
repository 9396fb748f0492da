"""The suffix-only loss equals the naive full-logits loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from paligemma_xray.model.processing import build_batch
from paligemma_xray.model.tiny import tiny_model
from paligemma_xray.train.batches import FeatureCache
from paligemma_xray.train.loss import image_features, loss_denominator, suffix_loss

SUFFIXES = [
    "<loc0100><loc0200><loc0300><loc0400> fracture",
    "<loc0010><loc0020><loc0030><loc0040> fracture ; <loc0500><loc0600><loc0700><loc0800> fracture",
    "",  # a negative image: only EOS is a target
]


def _batch(processor, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(40, 30, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    return build_batch(processor, images, ["detect fracture"] * n, SUFFIXES[:n], max_length=48)


def _naive(model, batch: dict[str, torch.Tensor], reduction: str = "example") -> torch.Tensor:
    """The reference: full logits at every position, shifted -100 mask, per-example mean."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    if reduction == "token":
        return (nll * mask).sum() / mask.sum()
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("reduction", ["example", "token"])
def test_matches_naive_loss_and_gradients(version: int, reduction: str) -> None:
    model, processor = tiny_model(version=version, seed=1)
    if version == 2:  # a small cap so that soft-capping visibly bends the logits
        model.config.text_config.final_logit_softcapping = 0.5
    batch = _batch(processor)
    ours = suffix_loss(model, batch, reduction=reduction, chunk_tokens=5)  # several chunks
    reference = _naive(model, batch, reduction)
    torch.testing.assert_close(ours.loss, reference, rtol=1e-5, atol=1e-6)
    # Every weight trainable, the tied embedding / lm_head included.
    g_ours, g_ref = _grads(model, ours.loss), _grads(model, reference)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_suffix_tokens_count() -> None:
    model, processor = tiny_model(version=1, seed=0)
    batch = _batch(processor)
    out = suffix_loss(model, batch)
    expected = (batch["labels"][:, 1:] != -100).sum()
    assert out.token_nll.shape == (int(expected),)
    # Changing a prompt token's label would not matter; changing a suffix token must.
    altered = dict(batch)
    labels = batch["labels"].clone()
    first_target = int((labels[0] != -100).nonzero()[0])
    labels[0, first_target] = (labels[0, first_target] + 1) % 100
    altered["labels"] = labels
    assert not torch.isclose(suffix_loss(model, altered).loss, out.loss)


def test_global_denominator_splits_a_batch_exactly() -> None:
    """Two micro-batches with the global denominator sum to the full batch's loss."""
    model, processor = tiny_model(version=1, seed=0)
    batch = _batch(processor)
    whole = suffix_loss(model, batch).loss
    parts = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 1), slice(1, 3))]
    total = loss_denominator(batch["labels"])
    summed = sum(suffix_loss(model, p, denominator=total).loss for p in parts)
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-6)


def test_cached_image_features_give_the_same_loss() -> None:
    model, processor = tiny_model(version=1, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.self_attn.q_proj.weight.requires_grad_(True)
    batch = _batch(processor)
    cache = FeatureCache()
    keys = ["a", "b", "c"]
    features = cache.get(lambda px: image_features(model, px), keys, batch["pixel_values"])
    assert len(cache) == 3
    cached = suffix_loss(model, batch, features=features)
    plain = suffix_loss(model, batch)
    torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-6, atol=1e-7)
    g_cached, g_plain = _grads(model, cached.loss), _grads(model, plain.loss)
    for name in g_plain:
        torch.testing.assert_close(g_cached[name], g_plain[name], rtol=1e-5, atol=1e-7)
    # Second use reads the cache (the compute function must not be called again).
    again = cache.get(lambda px: pytest.fail("recomputed a cached image"), keys[::-1], batch["pixel_values"])
    torch.testing.assert_close(again, features.flip(0))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_location_smoothing_is_cross_entropy_against_a_gaussian_over_bins(softcap) -> None:
    """``location_sigma``: location targets become a Gaussian over the 1024 bins (value and
    gradients equal the explicit soft-target cross-entropy); other targets stay one-hot and
    the reported NLL stays the one-hot NLL."""
    from paligemma_xray.train.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    vocab, first, n, width, sigma = 1100, 60, 29, 8, 3.0
    hidden = torch.randn(n, width, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:15] = torch.randint(first, first + 1024, (15,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    loss, nll = linear_cross_entropy(
        hidden, weight, targets, weights, softcap=softcap, chunk=6, location_smoothing=(first, sigma)
    )
    grads = torch.autograd.grad(loss, (hidden, weight))

    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits, dim=-1)
    target_dist = F.one_hot(targets, vocab).double()
    for i, t in enumerate(targets.tolist()):
        if first <= t < first + 1024:
            bump = torch.exp(-0.5 * ((torch.arange(1024) - (t - first)) / sigma) ** 2).double()
            target_dist[i] = 0
            target_dist[i, first : first + 1024] = bump / bump.sum()
    reference = (-(target_dist * logp).sum(-1) * weights).sum()
    ref_grads = torch.autograd.grad(reference, (hidden, weight))

    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    one_hot_nll = -logp.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(nll.double(), one_hot_nll.detach(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the evaluation path (no autograd function) gives the same value
        no_grad_loss, _ = linear_cross_entropy(
            hidden, weight, targets, weights, softcap=softcap, chunk=6, location_smoothing=(first, sigma)
        )
    assert float(no_grad_loss) == pytest.approx(float(reference), rel=1e-5)


def test_location_smoothing_rewards_near_misses() -> None:
    """A near miss costs less than a far one with smoothing; with one-hot they cost the same."""
    from paligemma_xray.train.loss import linear_cross_entropy

    first, vocab = 10, 1040
    weight = torch.eye(vocab)
    target = torch.tensor([first + 500])

    def cost(guess_bin: int, smoothing):
        hidden = torch.zeros(1, vocab)
        hidden[0, first + guess_bin] = 20.0
        loss, _ = linear_cross_entropy(hidden, weight, target, torch.ones(1), location_smoothing=smoothing)
        return float(loss)

    assert cost(503, (first, 4.0)) < cost(560, (first, 4.0)) - 1.0
    assert cost(503, None) == pytest.approx(cost(560, None))
