"""Batched greedy decoding with a KV cache, returning per-token log-probabilities.

Why not ``model.generate``: for short detection answers (a box is 5-7 tokens) its per-step
machinery dominates (logits processors, stopping criteria, kwargs bookkeeping, a fresh
attention mask through the generic mask factory), it keeps finished rows in the batch
until the longest one ends, and it returns no log-probabilities unless asked for full
score tensors. This loop:

* prefills the left-padded prompt batch once, with ``token_type_ids`` so image and prefix
  attend to each other fully (prefix-LM), computing logits for the last position only;
* then feeds one token per step for the rows still running, straight into the language
  model (the image is in the cache already) with positions that continue each row's own
  count (left padding shifts rows differently), and the output head applied to that
  single position;
* drops rows that produced EOS from the batch and from the cache, so the last long answer
  does not drag the finished ones through every step;
* records the log-probability of each chosen token (log-softmax over the full vocabulary);
* computes the logits through :func:`paligemma_xray.model.head.logits`: with 16-bit weights
  the location, segmentation and EOS rows and each row's top tokens get float32 logits (a
  bfloat16 logit near 20 is rounded to 0.125, enough to reorder neighbouring location bins).

Plain greedy (``box_or_stop=None``) is token-for-token what
``model.generate(do_sample=False)`` produces (a test checks it).

The "emit a box or stop" rule (:class:`BoxOrStop`) answers a known trap of detection
heads: after fine-tuning, the probability of "a box starts here" is spread over 1024
location tokens, so at the first position (or after ``" ;"``) EOS can beat every single
location token while the location tokens together clearly beat EOS: greedy then stops
before any box although a box is likely. With the rule, at positions where a box may
start (and inside a box, before its fourth location token) all location tokens count as
one choice; when their total probability beats the best other token, the best location
token is taken. The log of that total mass is then recorded as the first location token's
log-probability, so a box's score reflects "is there a box here" rather than "is it
exactly this bin".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache  # built from the config (transformers >= 4.56; we need 5.17)

from paligemma_xray.model.head import kept
from paligemma_xray.model.head import logits as logits_of

# The model and its parts are transformers modules reached by attribute (``model.model.
# language_model``, ``layers``, ``rotary_emb``…), which torch types as ``Tensor | Module``:
# they are ``Any`` here, the tensors typed.


@dataclass
class BoxOrStop:
    """Where and how the "emit a box or stop" rule applies.

    Attributes:
        loc_ids: token ids of ``<loc0000>``..``<loc1023>`` (contiguous in PaliGemma's
            vocabulary, but given explicitly so any tokenizer works).
        start_after: token ids after which an object may start (the separator ``;`` and
            the bare space piece that precedes a ``<loc>`` in ``" ; <loc…>"``).
    """

    loc_ids: torch.Tensor
    start_after: frozenset[int] = field(default_factory=frozenset)
    min_box_probability: float | None = None
    """Also start a box where the location tokens together have at least this probability,
    even when another token (EOS) is likelier. ``None``: only where they beat it. A low
    value turns the decoder into a candidate generator, as detectors are evaluated: boxes
    below the greedy operating point come out with their (low) box probability as score, so
    mAP and FROC see the whole precision-recall curve instead of one point of it."""

    def __post_init__(self) -> None:
        if self.min_box_probability is not None and not 0 < self.min_box_probability <= 1:
            raise ValueError(f"min_box_probability must be in (0, 1], got {self.min_box_probability}")
        self.loc_ids = torch.as_tensor(self.loc_ids, dtype=torch.long)
        self._lo = int(self.loc_ids.min())
        self._hi = int(self.loc_ids.max()) + 1
        # A contiguous id range lets every step slice instead of gathering.
        self._contiguous = (self._hi - self._lo) == len(self.loc_ids)


@dataclass
class DecodeOutput:
    """Per row: the generated ids (EOS included when produced), their log-probabilities,
    and whether the row stopped at EOS (False: cut at ``max_new_tokens``)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def _lm_parts(model: Any) -> tuple[Any, nn.Module, float | None]:
    """(language model, output head, final logit soft-cap) of a PaliGemma model."""
    language_model = model.model.language_model
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return language_model, model.lm_head, softcap


def _choose(
    logits: torch.Tensor,
    rule: BoxOrStop | None,
    box_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and the log-probability recorded for it, for a (B, V) logits batch.

    ``box_state`` (B,) int: 0 = a box may start here, 1..3 = location tokens of the current
    box so far, -1 = elsewhere (plain greedy).
    """
    logp = torch.log_softmax(logits, dim=-1)
    token = logp.argmax(dim=-1)
    chosen = logp.gather(1, token[:, None])[:, 0]
    if rule is None or box_state is None:
        return token, chosen
    active = box_state >= 0
    if not bool(active.any()):
        return token, chosen
    if rule._contiguous:
        loc_logp = logp[:, rule._lo : rule._hi]
    else:
        loc_logp = logp.index_select(1, rule.loc_ids.to(logp.device))
    loc_mass = torch.logsumexp(loc_logp, dim=-1)
    best_loc_value, best_loc = loc_logp.max(dim=-1)
    best_loc_id = best_loc + rule._lo if rule._contiguous else rule.loc_ids.to(logp.device)[best_loc]
    other = logp.clone()
    if rule._contiguous:
        other[:, rule._lo : rule._hi] = -torch.inf
    else:
        other[:, rule.loc_ids.to(logp.device)] = -torch.inf
    best_other = other.max(dim=-1).values
    take_loc = active & (loc_mass > best_other)
    if rule.min_box_probability is not None:
        take_loc |= (box_state == 0) & (loc_mass >= math.log(rule.min_box_probability))
    token = torch.where(take_loc, best_loc_id, token)
    # Box start: the mass of "a box" is the confidence; inside a box: the bin's own.
    recorded = torch.where(box_state == 0, loc_mass, best_loc_value)
    chosen = torch.where(take_loc, recorded, logp.gather(1, token[:, None])[:, 0])
    return token, chosen


def _next_box_state(state: torch.Tensor, token: torch.Tensor, rule: BoxOrStop) -> torch.Tensor:
    is_loc = (token >= rule._lo) & (token < rule._hi)
    if not rule._contiguous:
        is_loc = torch.isin(token, rule.loc_ids.to(token.device))
    starts = torch.zeros_like(is_loc)
    if rule.start_after:
        starts = torch.isin(token, torch.tensor(sorted(rule.start_after), device=token.device))
    # Count location tokens of the current box: 0 -> 1 -> 2 -> 3, then the box is complete.
    inside = torch.where((state >= 0) & (state < 3) & is_loc, state + 1, torch.full_like(state, -1))
    # state 0 kept after a separator-like token (e.g. " ;" then " "): a box may still start.
    return torch.where(starts, torch.zeros_like(state), inside)


def _step_mask(attention_mask: torch.Tensor, attn: str, dtype: torch.dtype) -> torch.Tensor:
    # One query position that may see every real (non-pad) key: (B, 1, 1, kv).
    mask = attention_mask[:, None, None, :].bool()
    if attn == "eager":  # added to the scores: 0 where allowed, the dtype's minimum elsewhere
        zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = zeros.masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _step_layers(
    language_model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """One decoding step through the decoder layers, as Gemma's / Gemma 2's forward runs
    them, minus its per-call wrappers and mask factory (much of a small model's step)."""
    hidden = language_model.embed_tokens(input_ids)
    position_embeddings = language_model.rotary_emb(hidden, position_ids)
    for layer in language_model.layers[: language_model.config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
    return language_model.norm(hidden)


@torch.inference_mode()
def greedy_decode(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    box_or_stop: BoxOrStop | None = None,
) -> DecodeOutput:
    """Greedy-decode a left-padded prompt batch (from ``model.processing.build_batch``).

    ``batch`` holds ``input_ids``, ``attention_mask``, ``token_type_ids`` (0 everywhere in
    a prompt) and ``pixel_values``. Returns, per row, the new token ids and their
    log-probabilities (see the module doc for ``box_or_stop``).
    """
    input_ids = batch["input_ids"]
    attention_mask = batch["attention_mask"].to(torch.long)
    device = input_ids.device
    n_rows = input_ids.shape[0]
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    if max_new_tokens <= 0 or n_rows == 0:
        return DecodeOutput(tokens, logprobs, finished)

    # Positions as generate() makes them: count of real tokens so far, pads at 0, then
    # PaliGemma's 1-based shift. Each row continues from its own last position.
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0) + 1
    cache = DynamicCache(config=model.config.get_text_config())
    language_model, lm_head, softcap = _lm_parts(model)
    exact = kept(model)  # the head's decisive rows in float32, if the load cast them (model.head)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return logits_of(lm_head, hidden, exact, softcap)

    # The PaliGemma model without its head: the head is ours (model.head), on the last position.
    out = model.model(
        input_ids=input_ids,
        pixel_values=batch["pixel_values"],
        attention_mask=attention_mask,
        token_type_ids=batch.get("token_type_ids", torch.zeros_like(input_ids)),
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    cache = out.cache
    logits = head(out.last_hidden_state[:, -1, :])

    # SDPA takes a boolean (B, 1, q, kv) mask as is: building it here skips transformers'
    # generic mask factory on every step. Other attention kernels get the 2D mask.
    # Fast path: the step goes straight to the language model with a mask built here (SDPA
    # takes a boolean one, eager an additive one; Gemma 2 one per layer type), skipping the
    # generic mask factory. Any other case (sliding-window layers, other kernels) goes
    # through the full model, which builds its own masks.
    text_config = model.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    attn: str | None = getattr(text_config, "_attn_implementation", None)
    fast = (
        attn is not None
        and attn in ("sdpa", "eager")
        and (layer_types is None or set(layer_types) == {"full_attention"})
        and text_config.model_type in ("gemma", "gemma2")  # the layer loop _step_layers mirrors
    )
    mask_dtype = next(model.parameters()).dtype
    rows = torch.arange(n_rows, device=device)  # original row of each running row
    out_tokens = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
    next_pos = position_ids[:, -1:] + 1
    box_state = torch.zeros(n_rows, dtype=torch.long, device=device) if box_or_stop is not None else None
    for step in range(max_new_tokens):
        token, chosen = _choose(logits, box_or_stop, box_state)
        # Histories stay on the device; the host reads one flag per step (any row done?).
        out_tokens[rows, step] = token
        out_logprobs[rows, step] = chosen.to(torch.float32)
        if step == max_new_tokens - 1:
            break
        if box_state is not None and box_or_stop is not None:
            box_state = _next_box_state(box_state, token, box_or_stop)
        done = torch.isin(token, eos)
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            rows, token = rows[keep], token[keep]
            attention_mask, next_pos = attention_mask[keep], next_pos[keep]
            if box_state is not None:
                box_state = box_state[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        if fast and attn is not None:
            mask = _step_mask(attention_mask, attn, mask_dtype)
            hidden = _step_layers(language_model, token[:, None], mask, next_pos, cache)
        else:
            hidden = model.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=next_pos,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        logits = head(hidden[:, -1, :])
        next_pos = next_pos + 1
    eos_set = set(eos.tolist())
    for row, (ids, logps) in enumerate(zip(out_tokens.tolist(), out_logprobs.tolist())):
        for token_id, logp in zip(ids, logps):
            if token_id < 0:
                break
            tokens[row].append(token_id)
            logprobs[row].append(logp)
            if token_id in eos_set:
                finished[row] = True
                break
    return DecodeOutput(tokens, logprobs, finished)
