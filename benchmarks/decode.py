"""Decoding speed: our ``Detector`` against transformers' ``generate``, same model, batch, prompt.

Not a test: a measurement, written as JSON (``--out``). Both sides decode greedily the same
prompt batch for the same number of new tokens; the run checks that they produce the same
tokens (our loop with "emit a box or stop" off is plain greedy) and reports images/s and
per-batch latency of each, and their ratio. ``Detector.detect`` (box-or-stop on, parsing
and scores included) is timed as well.

Presets (random weights; nothing is downloaded):

* ``tiny`` — the test suite's tiny PaliGemma 1 (CPU; target ≥ 1.5×);
* ``pg1-3b-224`` — PaliGemma 1 3B at 224 px (GPU; target ≥ 3× at ``--batch 32``).

Or ``--model PATH`` for a real checkpoint (HF folder or big_vision ``.npz``).

    python benchmarks/decode.py --preset tiny --out benchmarks/results/decode.json
    python benchmarks/decode.py --preset pg1-3b-224 --batch 32 --device cuda --dtype bfloat16 \\
        --out benchmarks/results/decode-3b.json

Random weights rarely produce EOS, so every row runs to ``--new-tokens``: that measures
per-step cost and leaves out our early drop of finished rows (which a trained model's
uneven answer lengths would reward). ``--eos-after`` makes rows stop early instead.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import PALIGEMMA1_3B_224, write_result
from PIL import Image

from paligemma_xray.infer import Detector


def build(preset: str, device: str, dtype: torch.dtype):
    from paligemma_xray.model.tiny import tiny_model

    if preset == "tiny":
        model, processor = tiny_model(version=1, seed=0)
    elif preset == "pg1-3b-224":
        from transformers import PaliGemmaForConditionalGeneration

        from paligemma_xray.model.bigvision import make_config

        dims = PALIGEMMA1_3B_224
        config = make_config(dims, hf_vocab=257216)
        # The real tokenizer is not shipped: the tiny one (same layout, fewer text pieces)
        # with an image processor for 224 px. Its <image> id replaces the real one.
        _, tiny_processor = tiny_model(version=1, seed=0)
        from paligemma_xray.model.processing import make_processor

        processor = make_processor(tiny_processor.tokenizer, 224)
        config.image_token_id = processor.image_token_id
        with torch.device(device):
            torch.manual_seed(0)
            model = PaliGemmaForConditionalGeneration(config)
    else:
        raise SystemExit(f"unknown preset {preset!r}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, processor


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_decoding(
    model,
    processor,
    *,
    batch_size: int,
    new_tokens: int,
    repeats: int,
    prompt: str = "detect fracture",
    device: str = "cpu",
    eos_after: int | None = None,
) -> dict:
    """Time ``Detector`` against ``generate`` on one prompt batch of random images.

    Returns the tokens check (``same_tokens_as_generate``), latency and images/s of each
    side (median of ``repeats`` interleaved runs after one warm-up) and their ratio.
    ``benchmarks/gpu_suite.py`` calls this at several batch sizes.
    """
    dtype = next(model.parameters()).dtype
    detector = Detector(model, processor, box_or_stop=False, batch_size=batch_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(batch_size)]

    from paligemma_xray.model.processing import build_batch

    batch = build_batch(processor, images, [prompt] * batch_size)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    eos = [processor.tokenizer.eos_token_id]
    if eos_after is not None:
        probe = detector.generate(images, prompt, max_new_tokens=eos_after + 1)
        eos = sorted({g.tokens[-1] for g in probe if len(g.tokens) > eos_after})
        detector._eos = eos

    def ours():
        return detector.generate(images, prompt, max_new_tokens=new_tokens)

    def theirs(prepared=None):
        # Images in, tokens and text out, like our side: preprocessing and detokenising count.
        inputs = prepared or {
            k: v.to(device) for k, v in build_batch(processor, images, [prompt] * batch_size).items()
        }
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    detect_detector = Detector(model, processor, box_or_stop=True, batch_size=batch_size)
    detect_detector._eos = eos

    def detect():
        return detect_detector.detect(images, prompt, max_new_tokens=new_tokens)

    # Same tokens? (the comparison is only fair if both do the same work)
    mine = [g.tokens for g in ours()]
    reference = theirs(dict(batch))[:, batch["input_ids"].shape[1] :].tolist()
    reference = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in reference]
    same = mine == reference

    times: dict[str, list[float]] = {"detector": [], "generate": [], "detect": []}
    for fn in (ours, theirs, detect):  # warm-up
        timed(fn, device)
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both
        times["detector"].append(timed(ours, device))
        times["generate"].append(timed(theirs, device))
        times["detect"].append(timed(detect, device))

    def summary(values):
        median = statistics.median(values)
        return {
            "latency_s": round(median, 5),
            "images_per_s": round(batch_size / median, 3),
            "runs_s": [round(v, 5) for v in values],
        }

    return {
        "batch": batch_size,
        "new_tokens": new_tokens,
        "prompt": prompt,
        "tokens_generated": sum(len(t) for t in mine),
        "same_tokens_as_generate": same,
        "detector": summary(times["detector"]),
        "generate": summary(times["generate"]),
        "detect_with_box_or_stop": summary(times["detect"]),
        "speedup": round(statistics.median(times["generate"]) / statistics.median(times["detector"]), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "pg1-3b-224"])
    parser.add_argument("--model", help="a real checkpoint instead of a preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", default="detect fracture")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--eos-after",
        type=int,
        default=None,
        help="treat the token each row emits at this step as EOS (uneven stops)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    if args.model:
        from paligemma_xray.model import load

        model, processor = load(args.model, dtype=dtype, device=args.device)
    else:
        model, processor = build(args.preset, args.device, dtype)
    result = {
        "preset": args.model or args.preset,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        **compare_decoding(
            model, processor, batch_size=args.batch, new_tokens=args.new_tokens, repeats=args.repeats,
            prompt=args.prompt, device=args.device, eos_after=args.eos_after,
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }  # fmt: skip
    same = result["same_tokens_as_generate"]
    write_result(result, args.out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
