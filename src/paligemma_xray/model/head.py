"""The output head in 16 bits without 16-bit decisions: the one owner of the logits' precision.

A bfloat16 logit keeps 8 significant bits: near 20 its neighbours are 0.125 apart, so the
model's own ranking of neighbouring location bins, and of "a box starts here" against EOS,
is rounded away before anyone looks at it. And rounding the head's float32 weights to 16
bits moves those logits again. Measured on the demo's fine-tuned model (its test split,
``evaluate --min-box-probability 0.05``, mAP@0.5): float32 0.741; everything in bfloat16
0.695; the top logits recomputed in float32 from the bfloat16 weights 0.724; and the rows of
the location tokens and EOS also kept in the checkpoint's own precision 0.736.

So, when the weights are cast to 16 bits, the loader keeps :func:`decisive_token_ids`' rows
of the output head in float32, from the checkpoint's own values (:func:`keep_rows`: 1,153
rows, 9 MB at 3B), and :func:`logits` computes them, and each row's :data:`TOP` likeliest
other tokens, with float32 products. The bulk of the vocabulary stays a bfloat16 matmul.
Float32 weights need none of this: :func:`logits` is then the plain head.

Example:

>>> import torch
>>> head = torch.nn.Linear(8, 40, bias=False)
>>> exact = ExactRows(torch.tensor([3, 5]), head.weight[[3, 5]].detach().clone())
>>> hidden = torch.randn(2, 8)
>>> out = logits(head.to(torch.bfloat16), hidden.to(torch.bfloat16), exact)
>>> out.dtype, bool(torch.allclose(out[:, [3, 5]], hidden.to(torch.bfloat16).float() @ exact.weight.T))
(torch.float32, True)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from paligemma_xray.model.tokenizer import LOC_TOKENS, SEG_TOKENS, token_id

#: Per row, the likeliest tokens whose 16-bit logits are recomputed with float32 products
#: (the next token is among them unless more than this many tie within 16-bit rounding).
TOP = 16


@dataclass(frozen=True)
class ExactRows:
    """Rows ``ids`` of the output head, in float32 as the checkpoint stored them."""

    ids: torch.Tensor  # (n,) long
    weight: torch.Tensor  # (n, width) float32

    def to(self, device: torch.device) -> ExactRows:
        if self.ids.device == device:
            return self
        return ExactRows(self.ids.to(device), self.weight.to(device))


# Per model: its kept rows, the head weight they belong to, and that weight's version
# counter then (an in-place update, e.g. a training step, makes them stale).
_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, tuple[ExactRows, torch.Tensor, int]] = (
    weakref.WeakKeyDictionary()
)


def decisive_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a detection or segmentation answer turns on: the 1,024 location tokens,
    the 128 segmentation codes and EOS."""
    ids = {token_id(tokenizer, token) for token in LOC_TOKENS + SEG_TOKENS}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def keep_rows(embedding: torch.Tensor, ids: list[int], target: torch.dtype | None) -> ExactRows | None:
    """The rows ``ids`` of a checkpoint's ``embedding`` (the head is tied to it), in float32,
    when casting to ``target`` loses precision; ``None`` when it does not."""
    sixteen = {torch.float16, torch.bfloat16}
    lossy = target in sixteen and (embedding.dtype == torch.float32 or {embedding.dtype, target} == sixteen)
    if not lossy:
        return None
    inside = [i for i in ids if 0 <= i < embedding.shape[0]]
    index = torch.tensor(inside, dtype=torch.long)
    return ExactRows(index, embedding.index_select(0, index).to(torch.float32))


def remember(model: torch.nn.Module, rows: ExactRows | None) -> None:
    """Attach ``rows`` to ``model``'s output head (a no-op for ``None``); :func:`kept` finds them."""
    if rows is not None:
        weight = head_weight(model)
        _KEPT[model] = (rows, weight, weight._version)


def kept(model: torch.nn.Module) -> ExactRows | None:
    """The rows the loader kept for ``model``, while its head is the one they were kept for
    and unchanged since (``None`` after a training step or a re-cast)."""
    entry = _KEPT.get(model)
    if entry is None:
        return None
    rows, weight, version = entry
    now = head_weight(model)
    if now is not weight or now._version != version:
        del _KEPT[model]
        return None
    return rows


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output head's weight Parameter of a transformers model (the embedding's, when tied)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return head.weight


def logits(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    exact: ExactRows | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Float32 logits of ``hidden`` (B, width) through the output head ``lm_head``.

    A 16-bit head (or autocast): the bulk in 16 bits; each row's :data:`TOP` likeliest
    tokens, then the ``exact`` rows, recomputed with float32 products (``exact``'s weights for
    its ids, the head's own for the others). ``softcap``: Gemma 2's final soft-capping.
    """
    raw = lm_head(hidden)
    out = raw.float()
    if raw.dtype != torch.float32:  # 16-bit weights, or 16-bit autocast (training's validation)
        with torch.autocast(hidden.device.type, enabled=False):
            weight = lm_head.get_parameter("weight")
            wide = hidden.float()
            top = torch.unique(out.topk(min(TOP, out.shape[-1]), dim=-1).indices)
            out[:, top] = wide @ weight.index_select(0, top).float().T
            if exact is not None:
                exact = exact.to(hidden.device)
                out[:, exact.ids] = wide @ exact.weight.T
    if softcap is not None:
        out = torch.tanh(out / softcap) * softcap
    return out
