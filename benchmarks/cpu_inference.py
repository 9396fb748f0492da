"""The 3B model on a CPU: our ``predict`` against the seed's own inference code, at real size.

Random weights with ``paligemma-3b-pt-224.f16.npz``'s exact keys, shapes and dtype (5.85 GB)
and a SentencePiece file of the real tokenizer's layout (``real_size.py`` builds them; kept
in ``--cache`` and reused), 8 synthetic radiographs, ``detect fracture``, a fixed budget of
new tokens. Each side in its own fresh process, one after the other (the machine's memory
is not enough for two 3B processes at once on a shared box):

- ``seed``: the seed's code path as it writes it (big_vision's HF port):
  ``PaliGemmaForConditionalGeneration.from_pretrained(hf_folder, torch_dtype=torch.bfloat16)``,
  ``PaliGemmaProcessor``, then ``model.generate(**inputs, max_new_tokens=N, do_sample=False)``
  per image (``min_new_tokens=N`` too, so that both sides make the same number of tokens).
  The HF folder is the npz converted once (float16, as the file), cached beside it.
- ``ours``: ``predict`` on the same images, default settings (the dtype our CPU choice makes:
  bfloat16 on a CPU with native bf16 matmul), straight from the ``.npz``;
- ``ours_float16``: the same with ``--dtype float16`` (the checkpoint's, our former default).

Per side: load time, time to the first result (from the end of the load), images/s over
the images after the load (load excluded), peak RSS (the process's ``ru_maxrss``), the
new tokens made, torch's thread count and the load average before it started. Targets:
ours ≥ 4× the seed's images/s at ≤ 0.6× its peak RSS, and ≥ 3× ``ours_float16``.
``--profile``: one image through our Detector under ``torch.profiler``: image loading,
preprocessing, the prefill and the decode steps, with the top ops.

    nice -n 10 .venv/bin/python benchmarks/cpu_inference.py --cache /work/bench-cache/pg1-224-f16 \\
        --out benchmarks/results/cpu_inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import PALIGEMMA1_3B_224, write_result

NPZ_NAME = "paligemma-3b-pt-224.f16.npz"
TOKENIZER_NAME = "paligemma_tokenizer.model"
PROMPT = "detect fracture"

# Each side runs this in a fresh process: argv = side, npz, hf, images dir, tokens, extra json.
_SIDE = r"""
import json, os, resource, sys, time
side, npz, hf, images_dir, tokens = sys.argv[1:6]
tokens = int(tokens)
load_average = os.getloadavg()[0]
import torch
from pathlib import Path
images = sorted(str(p) for p in Path(images_dir).iterdir())
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = {"side": side, "threads": torch.get_num_threads(), "load_average_before": round(load_average, 2),
          "images": len(images), "max_new_tokens": tokens}
if side == "seed":
    # The seed's inference code, as written there (HF port of big_vision's PaliGemma).
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(hf, torch_dtype=torch.bfloat16).eval()
    processor = PaliGemmaProcessor.from_pretrained(hf)
    result["load_s"] = time.perf_counter() - t0
    result["peak_rss_after_load_bytes"] = peak()
    result["dtype"] = str(model.dtype).removeprefix("torch.")
    t1 = time.perf_counter()
    made = []
    for path in images:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=PROMPT_PLACEHOLDER, images=image, return_tensors="pt").to(torch.bfloat16)
        n = inputs["input_ids"].shape[-1]
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        processor.decode(out[0][n:], skip_special_tokens=True)
        made.append(int(out.shape[-1] - n))
        if len(made) == 1:
            result["first_result_s"] = time.perf_counter() - t1
    result["run_s"] = time.perf_counter() - t1
elif side == "profile":
    # One image through our Detector, default dtype: image loading, preprocessing, the prefill
    # (max_new_tokens=1) and the whole answer, then torch.profiler's top ops over the whole.
    from torch.profiler import ProfilerActivity, profile
    from paligemma_xray.data import load_image
    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.decode import greedy_decode
    from paligemma_xray.model.processing import build_batch
    t0 = time.perf_counter()
    detector = Detector.load(npz, progress=False)
    result["load_s"] = time.perf_counter() - t0
    result["dtype"] = detector.dtype
    t = time.perf_counter()
    image = load_image(images[0])
    result["image_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    batch = build_batch(detector.processor, [image], [PROMPT_PLACEHOLDER])
    batch["pixel_values"] = batch["pixel_values"].to(detector.model.dtype)
    result["preprocess_s"] = time.perf_counter() - t
    def decode(n):
        with torch.inference_mode():
            return greedy_decode(detector.model, batch, max_new_tokens=n, eos_token_id=detector._eos)
    decode(1)  # warm-up
    t = time.perf_counter()
    decode(1)
    result["prefill_s"] = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        out = decode(tokens)
        whole = time.perf_counter() - t
    result["whole_answer_s"] = whole
    result["decode_steps_s"] = whole - result["prefill_s"]
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    result["top_ops"] = [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
                          "share": round(e.self_cpu_time_total / total, 3)} for e in events[:10]]
    made = [len(out.tokens[0])]
    result["run_s"] = result["first_result_s"] = whole
    model = detector.model
    side = "seed"  # model bytes below from `model`
else:
    from paligemma_xray.infer.predict import predict
    from paligemma_xray.infer.settings import PredictSettings
    dtype = None if side == "ours" else side.removeprefix("ours_")
    out = Path(sys.argv[6]) / side
    # What `paligemma-xray predict --model NPZ IMAGES --max-new-tokens N --overwrite` runs.
    settings = PredictSettings(model=[npz], paths=images, out=str(out), prompt=PROMPT_PLACEHOLDER,
                               max_new_tokens=tokens, overwrite=True, dtype=dtype)
    t0 = time.perf_counter()
    detector = settings.load_detector(progress=False)
    result["load_s"] = time.perf_counter() - t0
    result["peak_rss_after_load_bytes"] = peak()
    result["dtype"] = detector.dtype
    t1 = time.perf_counter()
    first = []
    def on_answer(name, text):
        if not first:
            first.append(time.perf_counter() - t1)
    predict(detector, settings, on_answer=on_answer, progress=False)
    result["run_s"] = time.perf_counter() - t1
    result["first_result_s"] = first[0]
    made = [len(json.loads(p.read_text())["tokens"]) for p in (out / "json").rglob("*.json")]
result["new_tokens"] = made
result["images_per_s"] = len(images) / result["run_s"]
result["model_bytes"] = sum(p.numel() * p.element_size() for p in
                            (model if side == "seed" else detector.model).parameters())
result["peak_rss_bytes"] = peak()
print(json.dumps(result))
""".replace("PROMPT_PLACEHOLDER", repr(PROMPT))


def prefill_flops(dims, prompt_tokens: int) -> float:
    """Multiply-adds × 2 of one image's prefill: the vision tower over its image tokens, the
    projector, the decoder over image + prompt tokens (projections, MLP, attention scores)."""
    image, width = dims.num_image_tokens, dims.width
    vision_layer = 4 * dims.vision_width**2 + 2 * dims.vision_width * dims.vision_mlp_dim
    vision_scores = 2 * 2 * image * image * dims.vision_width  # q·k and p·v
    vision = (
        dims.vision_depth * (2 * image * vision_layer + vision_scores) + 2 * image * dims.vision_width * width
    )
    seq = image + prompt_tokens
    attention = dims.heads * dims.head_dim
    text_layer = 2 * width * attention + 2 * width * dims.kv_heads * dims.head_dim + 3 * width * dims.mlp_dim
    scores = 2 * 2 * seq * seq * attention  # q·k and p·v
    return vision + dims.depth * (2 * seq * text_layer + scores)


_PEAK = r"""
import json, sys, time, torch
m, k, n = (int(v) for v in sys.argv[1:4])
weights = [torch.randn(n, k, dtype=torch.bfloat16) / 50 for _ in range(8)]  # 268 MB: out of cache
x = torch.randn(m, k, dtype=torch.bfloat16)
best = 0.0
with torch.inference_mode():
    for _ in range(4):
        t = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(x, w)
        best = max(best, len(weights) * 2 * m * k * n / (time.perf_counter() - t))
print(json.dumps({"gflops": best / 1e9, "threads": torch.get_num_threads()}))
"""


def bf16_peak(dims, rows: int) -> dict:
    """The best bfloat16 ``nn.Linear`` throughput of the decoder's MLP shape (``rows`` tokens,
    width → mlp_dim) in a fresh process: what this CPU's bf16 units give torch at all."""
    command = [sys.executable, "-c", _PEAK, str(rows), str(dims.width), str(dims.mlp_dim)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(cache: Path, n_images: int, smoke: bool = False) -> tuple[Path, Path, Path]:
    """The npz + tokenizer (built if absent), its HF folder (converted once), ``n_images`` images.

    ``smoke``: tiny widths with the real vocabulary (checks this script in a minute).
    """
    from real_size import MODELS, write_random_checkpoint

    from paligemma_xray.model import convert
    from paligemma_xray.model.tiny import real_layout_tokenizer

    cache.mkdir(parents=True, exist_ok=True)
    npz = cache / NPZ_NAME
    if not (cache / TOKENIZER_NAME).is_file():
        real_layout_tokenizer(cache / TOKENIZER_NAME)
    if not npz.is_file():
        partial = cache / f"{NPZ_NAME}.partial.npz"
        dims = MODELS["smoke"][0] if smoke else PALIGEMMA1_3B_224
        write_random_checkpoint(partial, dims, "float16")
        partial.rename(npz)
    hf = cache / "hf-f16"
    if not (hf / "config.json").is_file():
        print(f"converting {npz} to {hf} (once)", file=sys.stderr, flush=True)
        convert(npz, hf, progress=False)
    images = cache / f"images-{n_images}"
    if not images.is_dir():
        from paligemma_xray.data.synth import generate

        data = generate(
            cache / "synth", n=max(n_images, 12), seed=0, size=448, progress=False, overwrite=True
        )
        pictures = sorted(p for p in data.rglob("*.jpg"))[:n_images]
        staging = cache / f"images-{n_images}.partial"
        staging.mkdir(exist_ok=True)
        for p in pictures:
            (staging / p.name).write_bytes(p.read_bytes())
        staging.rename(images)
    return npz, hf, images


def run_side(side: str, npz: Path, hf: Path, images: Path, tokens: int, workdir: Path) -> dict:
    command = [sys.executable, "-c", _SIDE, side, str(npz), str(hf), str(images), str(tokens), str(workdir)]
    print(f"running {side} …", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode:
        raise SystemExit(f"{side} failed:\n{result.stderr[-4000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["images_per_s"] = float(f"{figures['images_per_s']:.4g}")  # ratios below use run_s
    for key in ("load_s", "run_s", "first_result_s", "image_load_s", "preprocess_s",
                "prefill_s", "whole_answer_s", "decode_steps_s"):  # fmt: skip
        if key in figures:
            figures[key] = round(figures[key], 3)
    figures["peak_rss_gib"] = round(figures["peak_rss_bytes"] / 2**30, 2)
    print(json.dumps(figures), file=sys.stderr, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", type=Path, required=True, help="folder for the 5.85 GB npz, its HF copy, images"
    )
    parser.add_argument("--images", type=int, default=8, help="images (default 8)")
    parser.add_argument(
        "--new-tokens", type=int, default=8, help="new tokens per image, both sides (default 8)"
    )
    parser.add_argument(
        "--sides", default="seed,ours,ours_float16", help="which, in order (default seed,ours,ours_float16)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny widths, real vocabulary: checks the script"
    )
    parser.add_argument(
        "--profile", action="store_true", help="then one image through ours under torch.profiler"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()
    if args.profile:
        args.sides += ",profile"
    npz, hf, images = prepare(args.cache, args.images, smoke=args.smoke)
    workdir = args.cache / "outputs"
    sides = {
        side: run_side(side, npz, hf, images, args.new_tokens, workdir) for side in args.sides.split(",")
    }
    result: dict = {
        "benchmark": "cpu_inference",
        "model": f"random weights, {NPZ_NAME} shapes ({npz.stat().st_size / 1e9:.2f} GB)",
        "prompt": PROMPT,
        "cpu_count": os.cpu_count(),
        "sides": sides,
        "targets": "ours >= 4x seed images/s at <= 0.6x its peak RSS; ours >= 3x ours_float16",
    }
    if "seed" in sides and "ours" in sides:
        seed, ours = sides["seed"], sides["ours"]
        result["ours_over_seed"] = {
            "images_per_s": round(seed["run_s"] / ours["run_s"], 2),  # same images on both sides
            "peak_rss": round(ours["peak_rss_bytes"] / seed["peak_rss_bytes"], 2),
            "load_s": round(ours["load_s"] / seed["load_s"], 2),
            "first_result_s": round(ours["first_result_s"] / seed["first_result_s"], 2),
        }
    if "seed" in sides and "ours" in sides and not args.smoke:
        # The bound: every image's prefill is the same work on both sides, in bf16 on both.
        # At this CPU's best bf16 matmul rate (measured here, now) and with decoding free,
        # ours could not take less than this.
        from PIL import Image

        from paligemma_xray.model.processing import build_batch, make_processor
        from paligemma_xray.model.tokenizer import load_tokenizer

        dims = PALIGEMMA1_3B_224
        processor = make_processor(load_tokenizer(args.cache / TOKENIZER_NAME), dims.image_size, dims.patch)
        batch = build_batch(processor, [Image.new("RGB", (8, 8))], [PROMPT])
        prompt_tokens = batch["input_ids"].shape[-1] - dims.num_image_tokens  # BOS, prompt, "\n"
        flops = prefill_flops(PALIGEMMA1_3B_224, prompt_tokens)
        peak = bf16_peak(PALIGEMMA1_3B_224, PALIGEMMA1_3B_224.num_image_tokens + prompt_tokens)
        floor_s = args.images * flops / (peak["gflops"] * 1e9)
        ours = sides["ours"]
        result["compute_bound"] = {
            "prefill_gflop_per_image": round(flops / 1e9, 1),
            "bf16_linear_peak_gflops": round(peak["gflops"], 1),
            "ours_prefill_floor_s": round(floor_s, 2),
            "ours_share_of_floor": round(floor_s / ours["run_s"], 2),
            "best_possible_ours_over_seed": round(sides["seed"]["run_s"] / floor_s, 2),
            "seed_gflops_if_decode_free": round(args.images * flops / sides["seed"]["run_s"] / 1e9, 1),
        }
    if "ours_float16" in sides and "ours" in sides:
        result["ours_over_ours_float16"] = {
            "images_per_s": round(sides["ours_float16"]["run_s"] / sides["ours"]["run_s"], 2),
            "peak_rss": round(sides["ours"]["peak_rss_bytes"] / sides["ours_float16"]["peak_rss_bytes"], 2),
        }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
