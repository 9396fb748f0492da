"""Our training step against the plain transformers step, same model, batch and optimiser.

    python benchmarks/train_step.py --out benchmarks/results/train_step.json          # CPU case
    python benchmarks/train_step.py --preset pg1-3b-224 --out train_step_h100.json    # GPU case

Both steps run on ONE model prepared by the training engine for ``--recipe`` (default
``big-vision``: attention weights trainable in float32, everything else frozen, in bf16 on
GPU), with the recipe's optimiser (the training loop's), on the same batch:

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
ratios ours/plain, the FLOPs of a step (:func:`model_flops`, formula in the JSON) and on
GPU the model FLOP utilisation. ``benchmarks/gpu_suite.py`` imports :func:`build_model` and
:func:`compare_steps`.
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
from paligemma_xray.train.loop import _optimizer
from paligemma_xray.train.loss import image_features, suffix_loss, unwrap
from paligemma_xray.train.recipes import TrainConfig, preset
from paligemma_xray.train.strategies import count_parameters, prepare_model, vision_frozen

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


FLOPS_FORMULA = (
    "2*Nv*P*[vision runs] + 4*Nl*T + 2*Nl_trainable*T + 4*H*S + 2*H*S*[embedding trainable]; "
    "Nv: vision tower + projector weights, P: image patches in the batch (0 with cached features), "
    "Nl: language-model weights without the embedding (LoRA adapters included), T: non-padding "
    "positions, H: vocab rows x width (the output head), S: suffix (label) tokens; forward 2 per "
    "weight and token, backward 2 for input gradients (not into the frozen vision tower) + 2 for "
    "weight gradients of trainable weights only; attention scores (<2% at ~270 positions) not counted"
)


def model_flops(dims: Dims, batch: dict[str, torch.Tensor], model, *, vision_runs: bool = True) -> float:
    """FLOPs of one training step that the step must do whatever the implementation
    (:data:`FLOPS_FORMULA`), the same numerator for ours and the plain step: the output head
    counts the suffix positions only (logits elsewhere are wasted work), the frozen vision
    tower its forward pass only, and not at all when its features come from the cache."""
    core = unwrap(model).model
    vision_modules = (core.vision_tower, core.multi_modal_projector)
    vision = sum(p.numel() for m in vision_modules for p in m.parameters())
    language = [(n, p) for n, p in core.language_model.named_parameters() if "embed_tokens" not in n]
    n_language = sum(p.numel() for _, p in language)
    n_trainable = sum(p.numel() for _, p in language if p.requires_grad)
    embedding_trainable = core.language_model.embed_tokens.weight.requires_grad
    patches = batch["pixel_values"].shape[0] * dims.num_image_tokens
    positions = int(batch["attention_mask"].sum())
    targets = int((batch["labels"] != -100).sum())
    head = core.language_model.embed_tokens.weight.numel()  # vocab rows x width
    return float(
        2 * vision * patches * vision_runs
        + 4 * n_language * positions
        + 2 * n_trainable * positions
        + 4 * head * targets
        + 2 * head * targets * embedding_trainable
    )


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


def build_model(dims: Dims, device: torch.device, recipe: str = "big-vision", seed: int = 0):
    """A random model of ``dims`` prepared by the training engine for ``recipe``.

    Returns ``(model, config, bf16)``: bf16 autocast (frozen weights in bf16, trainable in
    float32) on CUDA, float32 on a CPU (the CPU figures in README.md were measured so; the
    loop's ``precision: auto`` picks bf16 on a CPU with native bf16 matmul, see frozen_dtype.py).
    """
    bf16 = device.type == "cuda"
    config = preset(recipe)
    torch.manual_seed(seed)
    hf_config = make_config(dims, hf_vocab=HF_VOCAB)
    with torch.device(device):  # build the 3B model straight on the GPU
        model = PaliGemmaForConditionalGeneration(hf_config)
    model = prepare_model(model, config, device, bf16=bf16)
    return model, config, bf16


def compare_steps(
    model,
    config: TrainConfig,
    dims: Dims,
    device: torch.device,
    bf16: bool,
    *,
    batch_size: int = 8,
    steps: int = 5,
    warmup: int = 2,
    seed: int = 0,
    cases: tuple[str, ...] = ("plain", "ours", "ours_cached"),
) -> dict:
    """Time the plain transformers step against ours on one prepared model and batch.

    Both use the recipe's optimiser (the training loop's own) over the same trainable
    weights and the same precision; each case starts from the same weights. ``ours_cached``
    (image features from the cache) runs only where the vision tower is frozen.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config, trainable)
    batch = {k: v.to(device) for k, v in make_batch(dims, batch_size, seed).items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    cache = FeatureCache()
    keys = list(range(batch_size))

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

    # Weights (and optimiser moments) change with every step; each case starts afresh.
    snapshot = [p.detach().clone() for p in trainable]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(trainable, snapshot):
                p.copy_(s)
        optimizer.state.clear()

    functions = {"plain": plain, "ours": lambda: ours(False), "ours_cached": lambda: ours(True)}
    if not vision_frozen(model):
        cases = tuple(c for c in cases if c != "ours_cached")
    memory = Memory(device)
    results = {}
    for name in cases:
        restore()
        results[name] = run_case(name, functions[name], optimizer, batch_size, steps, warmup, device, memory)
    n_trainable, n_total = count_parameters(model)
    out = {
        "recipe": config.recipe,
        "batch_size": batch_size,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "suffix_tokens": int((batch["labels"] != -100).sum()),
        "vocab_rows": HF_VOCAB,
        "parameters": {"trainable": n_trainable, "total": n_total},
        "precision": "bf16 autocast, trainable float32" if bf16 else "float32",
        "optimizer": config.optimizer,
        "cases": results,
        "memory_note": "CUDA max_memory_allocated" if device.type == "cuda" else "peak process RSS",
    }
    if "plain" in results:
        for name in results:
            if name != "plain":
                out[f"speedup_{name}"] = results[name]["examples_per_s"] / results["plain"]["examples_per_s"]
                out[f"memory_ratio_{name}"] = (
                    results[name]["peak_memory_bytes"] / results["plain"]["peak_memory_bytes"]
                )
    # FLOPs per case: the cached case does not run the vision tower.
    peak = peak_flops(device)
    out["flops_formula"] = FLOPS_FORMULA
    out["peak_bf16_flops"] = peak
    for name, case in results.items():
        case["model_flops_per_step"] = model_flops(dims, batch, model, vision_runs=name != "ours_cached")
        case["mfu"] = case["model_flops_per_step"] / case["seconds_per_step"] / peak if peak else None
    return out


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown card: no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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
    parser.add_argument("--recipe", default="big-vision", help="training recipe (default: big-vision)")
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
    dims = PRESETS[args.preset]
    model, config, bf16 = build_model(dims, device, args.recipe, args.seed)
    compared = compare_steps(
        model, config, dims, device, bf16,
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, seed=args.seed,
    )  # fmt: skip
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        **compared,
        # the names earlier results used
        "speedup": compared["speedup_ours"],
        "speedup_cached": compared.get("speedup_ours_cached"),
        "memory_ratio": compared["memory_ratio_ours"],
        "memory_ratio_cached": compared.get("memory_ratio_ours_cached"),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
