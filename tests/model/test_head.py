"""The output head in 16 bits: decisive rows kept in float32 by every loader, logits refined."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from paligemma_xray.model import load
from paligemma_xray.model.head import ExactRows, decisive_token_ids, keep_rows, kept, logits
from paligemma_xray.model.loading import EMBEDDING
from paligemma_xray.model.tokenizer import LOC_TOKENS, SEG_TOKENS, token_id


def test_keep_rows_only_when_the_cast_loses_bits():
    embedding = torch.randn(50, 8)
    rows = keep_rows(embedding, [3, 7, 49, 99], torch.bfloat16)  # 99: past the end, ignored
    assert rows is not None
    assert rows.ids.tolist() == [3, 7, 49]
    assert rows.weight.dtype == torch.float32
    assert torch.equal(rows.weight, embedding[[3, 7, 49]])
    assert keep_rows(embedding, [3], torch.float32) is None
    assert keep_rows(embedding, [3], None) is None
    assert keep_rows(embedding.to(torch.bfloat16), [3], torch.bfloat16) is None
    sixteen = keep_rows(embedding.to(torch.float16), [3], torch.bfloat16)  # 3 mantissa bits lost
    assert sixteen is not None and torch.equal(sixteen.weight, embedding[[3]].half().float())


def test_logits_refine_the_top_and_the_exact_rows_in_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    hidden = torch.randn(3, 64)
    reference = (hidden.double() @ head.weight.double().T).float()  # float32 weights, exact
    exact = keep_rows(head.weight.detach(), list(range(200, 300)), torch.bfloat16)
    assert exact is not None
    low = head.to(torch.bfloat16)
    h16 = hidden.to(torch.bfloat16)
    plain = low(h16).float()
    refined = logits(low, h16, exact)
    # The exact rows: float32 weights against the 16-bit hidden state, float32 products.
    torch.testing.assert_close(refined[:, 200:], (h16.double() @ exact.weight.double().T).float())
    # Closer to the float32 model than the plain 16-bit head, where it matters.
    error_refined = (refined[:, 200:] - reference[:, 200:]).abs().max()
    assert error_refined < (plain[:, 200:] - reference[:, 200:]).abs().max()
    # Each row's likeliest token among the others: its value from float32 products too.
    best = plain[:, :200].argmax(-1)
    wide = (h16.float() @ low.weight.float().T)[torch.arange(3), best]
    assert torch.equal(refined[torch.arange(3), best], wide)
    # Untouched elsewhere; in float32 the head is the plain one.
    others = torch.ones(300, dtype=torch.bool)
    others[200:] = False
    others[plain.topk(16, dim=-1).indices.unique()] = False
    assert torch.equal(refined[:, others], plain[:, others])
    assert torch.equal(logits(head.float(), hidden), head.float()(hidden))


def test_softcap_after_the_refinement():
    head = torch.nn.Linear(8, 20, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 8, dtype=torch.bfloat16) * 30
    capped = logits(head, hidden, softcap=5.0)
    assert capped.abs().max() <= 5.0
    torch.testing.assert_close(capped, torch.tanh(logits(head, hidden) / 5.0) * 5.0)


def _check_kept(model, processor, source: torch.Tensor) -> None:
    rows = kept(model)
    assert rows is not None
    ids = decisive_token_ids(processor.tokenizer)
    assert rows.ids.tolist() == ids
    tok = processor.tokenizer
    assert token_id(tok, LOC_TOKENS[0]) in ids and token_id(tok, SEG_TOKENS[-1]) in ids
    assert tok.eos_token_id in ids
    assert torch.equal(rows.weight, source[ids].float())  # the checkpoint's float32, not bf16's


def test_every_loader_keeps_the_rows_of_a_float32_checkpoint_cast_to_bfloat16(
    tiny_hf_dir, tiny_npz, tmp_path
):
    source = load_file(tiny_hf_dir / "model.safetensors")
    embedding = next(v for k, v in source.items() if k.endswith("embed_tokens.weight"))
    assert embedding.dtype == torch.float32
    model, processor = load(tiny_hf_dir, dtype="bfloat16")  # HF folder, cast tensor by tensor
    _check_kept(model, processor, embedding)
    model32, _ = load(tiny_hf_dir, dtype="float32")
    assert kept(model32) is None  # nothing lost, nothing kept

    npz, tokenizer = tiny_npz  # big_vision .npz
    model, processor = load(npz, tokenizer=tokenizer, dtype="bfloat16")
    reference, _ = load(npz, tokenizer=tokenizer, dtype="float32")
    _check_kept(model, processor, reference.state_dict()[EMBEDDING])


def test_kept_rows_go_stale_when_the_head_changes(tiny_hf_dir):
    model, _ = load(tiny_hf_dir, dtype="bfloat16")
    assert isinstance(kept(model), ExactRows)
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(1.0)  # e.g. a training step
    assert kept(model) is None
