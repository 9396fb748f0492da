"""QLoRA against LoRA on the CPU: the training loop's step (suffix-only loss, image features
from the cache, AdamW) over a 4-bit NF4 base (bitsandbytes' CPU kernels) and over the float32
base, same model, batch and optimiser, timed in one process, float32 compute (``precision:
auto`` on a CPU); each recipe as its preset sets it (``qlora`` also checkpoints activations).

    python benchmarks/qlora_cpu.py --threads 2 --out benchmarks/results/qlora_cpu.json

Models (random weights, nothing downloaded, the test suite's): ``tiny`` (tiny PaliGemma 1,
1,792-row vocabulary) and ``tiny-real-vocab`` (the same widths with the real 257,152-piece
vocabulary and tokenizer layout). JSON: seconds per step and peak process RSS for each recipe,
and ``qlora_over_lora`` (the ratios, measured in the same run). At these widths the 4-bit
weights are a small share of the model: the ratio says what the 4-bit path costs per step
here, not what it saves on a 3B model.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from _common import write_result
from PIL import Image
from train_step import Memory, run_case

from paligemma_xray.model import build_batch
from paligemma_xray.model.tiny import REAL_VOCAB_SIZE, tiny_model
from paligemma_xray.train import preset
from paligemma_xray.train.batches import FeatureCache
from paligemma_xray.train.loop import _optimizer
from paligemma_xray.train.loss import image_features, suffix_loss
from paligemma_xray.train.strategies import prepare_model

MODELS = {"tiny": {}, "tiny-real-vocab": {"vocab_size": REAL_VOCAB_SIZE}}
SUFFIX = "<loc0100><loc0200><loc0400><loc0500> fracture ; <loc0600><loc0100><loc0900><loc0300> fracture"


def _step(name: str, recipe: str, args: argparse.Namespace) -> dict:
    config = preset(recipe)
    model, processor = tiny_model(version=1, seed=args.seed, **MODELS[name])
    torch.manual_seed(args.seed)  # the same adapters in both recipes
    model = prepare_model(model, config, torch.device("cpu"), bf16=False)
    rng = np.random.default_rng(args.seed)
    images = [
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(args.batch_size)
    ]
    batch = build_batch(processor, images, ["detect fracture"] * args.batch_size, [SUFFIX] * args.batch_size)
    optimizer = _optimizer(config, [p for p in model.parameters() if p.requires_grad])
    cache, keys = FeatureCache(), list(range(args.batch_size))

    def step() -> float:
        features = cache.get(lambda px: image_features(model, px), keys, batch["pixel_values"])
        loss = suffix_loss(model, batch, features=features).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    memory = Memory(torch.device("cpu"))
    case = run_case(
        recipe, step, optimizer, args.batch_size, args.steps, args.warmup, torch.device("cpu"), memory
    )
    return {k: case[k] for k in ("seconds_per_step", "examples_per_s", "peak_memory_bytes", "last_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch seed (default: 0)")
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes

    models = {}
    for name in MODELS:
        recipes = {recipe: _step(name, recipe, args) for recipe in ("lora", "qlora")}
        lora, qlora = recipes["lora"], recipes["qlora"]
        models[name] = {
            **recipes,
            "qlora_over_lora": {
                "seconds_per_step": round(qlora["seconds_per_step"] / lora["seconds_per_step"], 3),
                "peak_memory": round(qlora["peak_memory_bytes"] / lora["peak_memory_bytes"], 3),
            },
        }
    write_result(
        {
            "device": platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "bitsandbytes": bitsandbytes.__version__,
            "batch_size": args.batch_size,
            "step": "suffix-only loss, cached image features, AdamW, float32 compute",
            "models": models,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
