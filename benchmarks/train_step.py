"""Our training step against the plain transformers step, same model, batch and optimiser.

    python benchmarks/train_step.py --out benchmarks/results/train_step.json          # CPU case
    python benchmarks/train_step.py --preset pg1-3b-224 --out train_step_h100.json    # GPU case

Both steps run on ONE prepared model (``big-vision``: attention weights trainable in float32,
everything else frozen, in bf16 on GPU), with the same SGD optimiser, on the same batch:

- ``plain``: ``model(**batch, labels=labels).loss`` — logits for every position over the
  whole vocabulary, transformers' token-mean cross-entropy;
- ``ours``: :func:`paligemma_xray.train.loss.suffix_loss` (suffix rows only, chunked fused
  lm_head + cross-entropy), image embeddings computed by the vision tower every step;
- ``ours_cached``: the same with the image embeddings from the feature cache, which is
  what the training loop does under ``big-vision`` (vision tower and projector frozen).

Presets: ``tiny-real-vocab`` (default; a tiny model with the REAL 257,216-row embedding, 224
px input = 256 image tokens, as in the real prompt) and ``pg1-3b-224`` (PaliGemma 1 3B at 224,
random weights, GPU). Batches are synthetic token ids laid out exactly as
``model.processing.build_batch`` lays them out (image tokens, BOS, prefix, "\\n" | suffix of
1–3 boxes, EOS, right padding); the real tokenizer is not needed for timing.

Output JSON: examples/s, peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
peak resident set during the timed steps, reset through ``/proc/self/clear_refs``), the
ratios ours/plain, and on GPU the model FLOP utilisation (see :func:`model_flops`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from _common import PALIGEMMA1_3B_224, TEXT_VOCAB, write_result
from transformers import PaliGemmaForConditionalGeneration

from paligemma_xray.model.bigvision import Dims, make_config
from paligemma_xray.model.processing import pad_right
from paligemma_xray.model.tiny import tiny_dims
from paligemma_xray.train.batches import FeatureCache
from paligemma_xray.train.loss import image_features, suffix_loss
from paligemma_xray.train.recipes import preset
from paligemma_xray.train.strategies import count_parameters, prepare_model

HF_VOCAB = 257216
LOC0 = 256000

PRESETS = {
    "tiny-real-vocab": tiny_dims(1, vocab_size=TEXT_VOCAB, image_size=224),
    "pg1-3b-224": PALIGEMMA1_3B_224,
}

# Dense bf16 peak of the card, for MFU (per GPU, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def make_batch(dims: Dims, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic ids padded by ``model.processing.pad_right`` (``build_batch``'s layout): a
    "detect fracture"-like prompt, 1–3 boxes."""
    g = torch.Generator().manual_seed(seed)
    image_tokens = dims.num_image_tokens
    rows = []
    for _ in range(batch_size):
        prompt = (
            [TEXT_VOCAB] * image_tokens + [2] + torch.randint(300, 20000, (3,), generator=g).tolist() + [108]
        )
        suffix: list[int] = []
        for k in range(int(torch.randint(1, 4, (1,), generator=g))):
            if k:
                suffix += [2162, 235248]  # " ;", " "
            suffix += [*(LOC0 + torch.randint(0, 1024, (4,), generator=g)).tolist(), 40977]  # 4 locs + label
        rows.append((prompt, [*suffix, 1]))
    pixel_values = torch.rand((batch_size, 3, dims.image_size, dims.image_size), generator=g) * 2 - 1
    return pad_right([p for p, _ in rows], [s for _, s in rows], pixel_values, pad_id=0)


def model_flops(dims: Dims, batch: dict[str, torch.Tensor], model) -> float:
    """Model FLOPs of one training step, the usual 6·N·tokens convention (2 forward + 4
    backward per weight and token), the same numerator for both steps: vision tower ×
    patches, language model (without embeddings) × text positions, and the output head ×
    suffix tokens (the only positions the loss needs)."""
    core = model.model
    vision = sum(p.numel() for p in core.vision_tower.parameters()) + sum(
        p.numel() for p in core.multi_modal_projector.parameters()
    )
    language = sum(p.numel() for n, p in core.language_model.named_parameters() if "embed_tokens" not in n)
    patches = batch["pixel_values"].shape[0] * dims.num_image_tokens
    positions = int(batch["attention_mask"].sum())
    targets = int((batch["labels"] != -100).sum())
    return 6.0 * (vision * patches + language * positions + HF_VOCAB * dims.width * targets)


class Memory:
    """Peak memory during a block: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(name, step_fn, optimizer, batch_size, steps, warmup, device, memory: Memory) -> dict:
    for _ in range(warmup):
        step_fn()
    optimizer.zero_grad(set_to_none=True)
    memory.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [step_fn() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "examples_per_s": batch_size * steps / seconds,
        "seconds_per_step": seconds / steps,
        "peak_memory_bytes": memory.peak(),
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="tiny-real-vocab",
        help="model sizes (default: tiny-real-vocab; pg1-3b-224 needs a GPU)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch seed (default: 0)")
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else (args.device if args.device != "auto" else "cpu")
    )
    bf16 = device.type == "cuda"
    dims = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    config = make_config(dims, hf_vocab=HF_VOCAB)
    with torch.device(device):  # build the 3B model straight on the GPU
        model = PaliGemmaForConditionalGeneration(config)
    model = prepare_model(model, preset("big-vision"), device, bf16=bf16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)  # big-vision: no momentum, no weight decay
    batch = {k: v.to(device) for k, v in make_batch(dims, args.batch_size, args.seed).items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    cache = FeatureCache()
    keys = list(range(args.batch_size))

    def plain() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ours(cached: bool) -> float:
        with autocast:
            features = (
                cache.get(lambda px: image_features(model, px), keys, batch["pixel_values"])
                if cached
                else None
            )
            loss = suffix_loss(model, batch, features=features).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # Weights change with every step; each case starts from the same snapshot.
    snapshot = [p.detach().clone() for p in trainable]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(trainable, snapshot):
                p.copy_(s)

    memory = Memory(device)
    cases = {}
    for name, fn in (("plain", plain), ("ours", lambda: ours(False)), ("ours_cached", lambda: ours(True))):
        restore()
        cases[name] = run_case(name, fn, optimizer, args.batch_size, args.steps, args.warmup, device, memory)

    n_trainable, n_total = count_parameters(model)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "suffix_tokens": int((batch["labels"] != -100).sum()),
        "vocab_rows": HF_VOCAB,
        "parameters": {"trainable": n_trainable, "total": n_total},
        "precision": "bf16 autocast, trainable float32" if bf16 else "float32",
        "cases": cases,
        "speedup": cases["ours"]["examples_per_s"] / cases["plain"]["examples_per_s"],
        "speedup_cached": cases["ours_cached"]["examples_per_s"] / cases["plain"]["examples_per_s"],
        "memory_ratio": cases["ours"]["peak_memory_bytes"] / cases["plain"]["peak_memory_bytes"],
        "memory_ratio_cached": cases["ours_cached"]["peak_memory_bytes"]
        / cases["plain"]["peak_memory_bytes"],
        "memory_note": "CUDA max_memory_allocated" if bf16 else "peak process RSS during the timed steps",
    }
    if device.type == "cuda":
        flops = model_flops(dims, batch, model)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result["model_flops_per_step"] = flops
        result["peak_bf16_flops"] = peak
        if peak:
            for case in cases.values():
                case["mfu"] = flops / case["seconds_per_step"] / peak
    write_result(result, args.out)


if __name__ == "__main__":
    main()
