"""Suffix-only next-token loss without logits for every position × the whole vocabulary.

The plain ``model(**batch, labels=labels)`` computes ``lm_head`` at every position (256+
image tokens, the prompt, padding) over 257,216 rows and keeps those logits, in float32,
for the backward pass: most of the memory and a large share of the time of a step. Only
suffix positions carry a label, so here the model *body* runs (``model.model`` with
``token_type_ids``, which makes the prefix-LM mask right), the hidden states are gathered at
the (shifted) label positions only, and ``lm_head`` + cross-entropy run over those rows in
chunks inside one autograd function that computes its input gradients on the fly: no
``(tokens, vocabulary)`` tensor outlives a chunk.

Reductions: ``example`` = mean NLL over each example's suffix tokens, then mean over the
batch (big_vision); ``token`` = mean over every suffix token of the batch. For gradient
accumulation and several processes the caller passes the *global* ``denominator`` (see
:func:`loss_denominator`) so that the summed gradients equal the full batch's.

Location smoothing (``location_sigma`` > 0, off by default): a ``<locNNNN>`` target is
replaced by a Gaussian over the 1024 location bins centred on it. With one-hot targets a
guess 5 bins off costs as much as one 500 bins off, so a model that has not yet found the
object gets no signal about *where* to look; the smoothed target rewards being close. The
per-token NLL reported beside the loss stays the one-hot NLL, comparable across settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from paligemma_xray.locations import LOC_BINS
from paligemma_xray.train.strategies import unwrap

IGNORE = -100
# Elements of one float32 logits chunk (~256 MB); three such buffers live at a time.
_CHUNK_ELEMENTS = 2**26


@dataclass
class SuffixLoss:
    """Result of :func:`suffix_loss`."""

    loss: torch.Tensor
    """Scalar to back-propagate: sum of token NLLs × their weights (see module doc)."""
    token_nll: torch.Tensor
    """(N,) float32, detached: NLL of every suffix token, in batch order."""
    example_index: torch.Tensor
    """(N,) int64: the example each token of ``token_nll`` belongs to."""

    def per_example(self, batch_size: int) -> torch.Tensor:
        """(batch_size,) mean NLL per example (NaN where an example has no suffix token)."""
        sums = torch.zeros(batch_size, dtype=torch.float32, device=self.token_nll.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, self.example_index, self.token_nll)
        counts.index_add_(0, self.example_index, torch.ones_like(self.token_nll))
        return sums / counts


def loss_denominator(labels: torch.Tensor, reduction: str = "example") -> int:
    """What a batch contributes to the loss's denominator: examples with at least one
    suffix token (``example``) or suffix tokens (``token``)."""
    counts = (labels[:, 1:] != IGNORE).sum(dim=1)
    if reduction == "token":
        return int(counts.sum())
    return int((counts > 0).sum())


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector output, (B, image_tokens, text_width): what the cache stores."""
    return unwrap(model).model.get_image_features(pixel_values).pooler_output


def suffix_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    reduction: str = "example",
    denominator: float | None = None,
    chunk_tokens: int = 0,
    features: torch.Tensor | None = None,
    location_sigma: float = 0.0,
    first_location_id: int | None = None,
) -> SuffixLoss:
    """Loss over suffix tokens (``labels != -100``) of ``batch`` (from ``build_batch``).

    ``features``: precomputed :func:`image_features` for the batch's images (then
    ``pixel_values`` is not used). ``denominator``: examples or tokens to divide by (default:
    this batch's own, i.e. a plain mean). ``chunk_tokens``: rows of ``lm_head`` per chunk (0:
    automatic). ``location_sigma``: width in bins of the Gaussian that replaces a location
    target (module doc); needs ``first_location_id``, the id of ``<loc0000>``.
    """
    if location_sigma > 0 and first_location_id is None:
        raise ValueError("location_sigma needs first_location_id (the id of <loc0000>)")
    if reduction not in ("example", "token"):
        raise ValueError(f"reduction must be 'example' or 'token', not {reduction!r}")
    core = unwrap(model)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"],
        "use_cache": False,
    }
    if features is not None:
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    else:
        inputs["pixel_values"] = batch["pixel_values"]
    hidden = core.model(**inputs).last_hidden_state  # (B, T, D) after the final norm

    # Position t predicts token t+1: gather hidden states where the NEXT token is a label.
    targets_grid = batch["labels"][:, 1:]
    rows, cols = (targets_grid != IGNORE).nonzero(as_tuple=True)
    picked = hidden[:, :-1][rows, cols]  # (N, D)
    targets = targets_grid[rows, cols]

    batch_size = batch["labels"].shape[0]
    per_example = torch.zeros(batch_size, dtype=torch.float32, device=rows.device)
    per_example.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
    if reduction == "example":
        weights = 1.0 / per_example[rows]
        default_denominator = float((per_example > 0).sum())
    else:
        weights = torch.ones_like(rows, dtype=torch.float32)
        default_denominator = float(rows.numel())
    weights = weights / max(denominator if denominator is not None else default_denominator, 1.0)

    text_config = core.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    weight = core.lm_head.weight
    chunk = chunk_tokens or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    # first_location_id is set whenever location_sigma > 0 (checked on entry).
    smoothing = (
        (first_location_id, location_sigma) if location_sigma > 0 and first_location_id is not None else None
    )
    loss, nll = linear_cross_entropy(
        picked, weight, targets, weights, softcap=softcap, chunk=chunk, location_smoothing=smoothing
    )
    return SuffixLoss(loss=loss, token_nll=nll, example_index=rows)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    softcap: float | None = None,
    chunk: int = 256,
    location_smoothing: tuple[int, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i weights_i * CE(softcap(hidden_i @ weight.T), targets_i)`` and the per-row NLL.

    ``location_smoothing = (first_location_id, sigma)`` turns location targets into Gaussians
    over the 1024 bins (module doc); the returned NLL stays the one-hot one. Chunked over rows;
    gradients for ``hidden`` and ``weight`` are formed chunk by chunk in
    the forward pass (each row's gradient needs only its own softmax), so backward is two
    multiplications by the incoming scalar gradient.
    """
    if hidden.shape[0] == 0:
        # A batch whose suffixes were all cut off: zero loss that still joins the graph.
        zero = (hidden.sum() + weight.sum()) * 0.0
        return zero, hidden.new_zeros(0, dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, weights, softcap, chunk, location_smoothing)
    nll, losses = [], []
    for s in range(0, hidden.shape[0], chunk):
        rows = targets[s : s + chunk]
        chunk_nll, z, lse, _ = _chunk_nll(hidden[s : s + chunk], weight, rows, softcap)
        nll.append(chunk_nll)
        soft = _soft_targets(rows, z.shape[1], location_smoothing)
        losses.append(chunk_nll if soft is None else _soft_ce(z, lse, chunk_nll, rows, soft))
    all_nll = torch.cat(nll)
    return (torch.cat(losses) * weights).sum(), all_nll


def _soft_targets(
    targets: torch.Tensor, vocab: int, location_smoothing: tuple[int, float] | None
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """For the rows whose target is a location token: (row indices, (rows, 1024) Gaussian
    target distributions, first location id); None when smoothing is off or no row has one."""
    if location_smoothing is None:
        return None
    first, sigma = location_smoothing
    bins = targets - first
    rows = ((bins >= 0) & (bins < LOC_BINS) & (first + LOC_BINS <= vocab)).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return None
    return rows, location_distribution(bins[rows].float(), sigma), first


def location_distribution(bins: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(..., 1024)`` Gaussians of width ``sigma`` over the location bins, centred on each
    (possibly fractional) value of ``bins``, each summing to 1: the smoothed target."""
    grid = torch.arange(LOC_BINS, device=bins.device, dtype=torch.float32)
    return torch.softmax(-0.5 * ((grid - bins[..., None]) / sigma) ** 2, dim=-1)


def _soft_ce(z, lse, nll, targets, soft) -> torch.Tensor:
    """Per-row cross-entropy against the smoothed targets (one-hot NLL on other rows)."""
    rows, q, first = soft
    out = nll.clone()
    out[rows] = lse[rows] - (q * z[rows, first : first + LOC_BINS]).sum(dim=1)
    return out


def _chunk_nll(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """NLL of one chunk, with the float32 logits, their log-sum-exp and tanh (softcap)."""
    z = (h @ weight.to(h.dtype).T).float()
    squashed = None
    if softcap is not None:
        squashed = torch.tanh(z / softcap)
        z = squashed * softcap
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, targets[:, None]).squeeze(1)
    return nll, z, lse, squashed


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, softcap, chunk, location_smoothing=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        losses = torch.empty_like(nll)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        compute = weight.to(hidden.dtype)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e]
            nll[s:e], z, lse, squashed = _chunk_nll(h, compute, targets[s:e], softcap)
            soft = _soft_targets(targets[s:e], z.shape[1], location_smoothing)
            losses[s:e] = nll[s:e] if soft is None else _soft_ce(z, lse, nll[s:e], targets[s:e], soft)
            # d(weighted CE)/d(logits) = (softmax - target) * weight_i, through tanh if softcapped.
            g = torch.exp(z - lse[:, None])
            onehot = torch.ones(e - s, dtype=torch.bool, device=g.device)
            if soft is not None:
                rows, q, first = soft
                onehot[rows] = False
                g[rows, first : first + LOC_BINS] -= q
            hard = onehot.nonzero(as_tuple=True)[0]
            g[hard, targets[s:e][hard]] -= 1.0
            g *= weights[s:e, None]
            if squashed is not None:
                g *= 1.0 - squashed * squashed
            del z
            g = g.to(hidden.dtype)
            if grad_h is not None:  # None unless hidden needs a gradient
                grad_h[s:e] = g @ compute
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(nll)
        return (losses * weights).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None
