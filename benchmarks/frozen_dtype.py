"""CPU training with the frozen weights in bfloat16 against all-float32: speed and peak RSS.

The ``big-vision`` recipe trains the attention projections (float32 either way); the rest
of the model is frozen. Kept in bfloat16, the frozen weights take half the memory, but
every matmul then runs in bfloat16 (autocast), which a CPU without bf16 units does much
more slowly than float32. This measures both on the same random medium-size model with the
real vocabulary, the same batch and SGD, each case in a FRESH process (peak RSS is the
process's high-water mark from the prepared model on, against the RSS after importing torch
and transformers).

    .venv/bin/python benchmarks/frozen_dtype.py --out benchmarks/results/frozen_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import TEXT_VOCAB, write_result

_CASE = r"""
import json, sys, time
import torch, transformers
sys.path.insert(0, sys.argv[1])
from train_step import make_batch
from transformers import PaliGemmaForConditionalGeneration
from paligemma_xray.model.bigvision import make_config
from paligemma_xray.model.tiny import tiny_dims
from paligemma_xray.train.loss import suffix_loss
from paligemma_xray.train.recipes import preset
from paligemma_xray.train.strategies import prepare_model

bf16, width, depth, mlp, batch_size, steps = sys.argv[2] == "bf16", *map(int, sys.argv[3:8])
torch.set_num_threads(int(sys.argv[8]))
def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmRSS"))
baseline = rss()
dims = tiny_dims(1, vocab_size=257152, image_size=224, width=width, depth=depth, heads=8, kv_heads=1,
                 head_dim=width // 8, mlp_dim=mlp, vision_width=576, vision_depth=8, vision_heads=8,
                 vision_mlp_dim=2304)
torch.manual_seed(0)
model = PaliGemmaForConditionalGeneration(make_config(dims, hf_vocab=257216))
model = prepare_model(model, preset("big-vision"), torch.device("cpu"), bf16=bf16)
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # the float32 build's freed pages back to the OS
held = rss()
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here: the prepared model training
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.SGD(trainable, lr=0.01)
batch = make_batch(dims, batch_size, 0)
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = suffix_loss(model, batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i:  # the first step warms up
        times.append(time.perf_counter() - t)
top = []
if sys.argv[9] == "1":  # one more step under torch.profiler: where the time goes, op by op
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = suffix_loss(model, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:12]:
        top.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "calls": e.count,
                    "self_ms": round(e.self_cpu_time_total / 1000, 1),
                    "share": round(e.self_cpu_time_total / total, 3)})
weights = sum(p.numel() * p.element_size() for p in model.parameters())
with open("/proc/self/status") as status:
    peak = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))
print(json.dumps({"seconds_per_step": sum(times) / len(times), "loss": float(loss),
                  "weights_bytes": weights, "baseline_bytes": baseline, "prepared_rss_bytes": held,
                  "peak_rss_bytes": peak, "profile_top_ops": top}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=1024, help="decoder width (default 1024)")
    parser.add_argument("--depth", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--mlp-dim", type=int, default=8192, help="decoder MLP width (default 8192)")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per step (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--profile", action="store_true", help="one extra step per case under torch.profiler: its top ops"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent)
    cases = {}
    for case in ("float32", "bf16"):
        argv = [here, case, args.width, args.depth, args.mlp_dim, args.batch_size, args.steps, args.threads]
        argv.append(int(args.profile))
        result = subprocess.run(
            [sys.executable, "-c", _CASE, *map(str, argv)], capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )  # fmt: skip
        if result.returncode:
            raise SystemExit(f"case {case} failed:\n{result.stderr[-3000:]}")
        cases[case] = json.loads(result.stdout.strip().splitlines()[-1])
    f32, b16 = cases["float32"], cases["bf16"]
    write_result(
        {
            "benchmark": "frozen_dtype",
            "model": {"width": args.width, "depth": args.depth, "mlp_dim": args.mlp_dim, "vocab": TEXT_VOCAB},
            "batch_size": args.batch_size,
            "threads": args.threads,
            "cases": cases,
            "bf16_over_float32": {
                "seconds_per_step": round(b16["seconds_per_step"] / f32["seconds_per_step"], 2),
                "peak_rss": round(
                    (b16["peak_rss_bytes"] - b16["baseline_bytes"])
                    / (f32["peak_rss_bytes"] - f32["baseline_bytes"]),
                    2,
                ),
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
