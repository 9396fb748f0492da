"""A tiny PaliGemma that answers a fixed segmentation: the real decoding path after its head.

A random model never writes a ``<seg>`` answer; this one's output head ignores what it sees
and writes :data:`ANSWER` (one box, 16 codes, "fracture") then EOS, so that everything after
the head (decoding, parsing, mask decoding, outputs) runs for real.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from paligemma_xray.infer import Detector
from paligemma_xray.locations import seg_token
from paligemma_xray.model.tiny import tiny_model

WIDTH, HEIGHT = 240, 160
BINS = (200, 150, 800, 700)  # y1 x1 y2 x2
CODES = np.random.default_rng(7).integers(0, 128, 16)
ANSWER = "".join(f"<loc{b:04d}>" for b in BINS) + "".join(seg_token(int(c)) for c in CODES) + " fracture"


class AnswerHead(nn.Module):
    """An output head that makes the model write ``ids`` then EOS, whatever it sees."""

    def __init__(self, ids: list[int], eos: int, vocab: int) -> None:
        super().__init__()
        self.ids, self.eos, self.vocab, self.calls = [*ids, eos], eos, vocab, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        target = self.ids[min(self.calls, len(self.ids) - 1)]
        self.calls += 1
        logits = torch.full((*hidden.shape[:-1], self.vocab), -30.0)
        logits[..., target] = 0.0
        return logits


def answering_detector(mask_decoder=None) -> Detector:
    model, processor = tiny_model(version=1, seed=0)
    tokenizer = processor.tokenizer
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    model.lm_head = AnswerHead(ids, tokenizer.eos_token_id, len(tokenizer) - 1)
    return Detector(model, processor, mask_decoder=mask_decoder, batch_size=1)
