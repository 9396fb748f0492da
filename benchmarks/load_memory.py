"""Peak memory of loading a big_vision ``.npz``, against the file's size.

Target (issue 3): a checkpoint loads without two full copies in memory, i.e. the peak
resident memory the load adds stays near 1× the checkpoint (at most about 1.5×).

Writes a random big_vision checkpoint of the requested size (streamed layer by layer, so
writing it does not need the memory either), then loads it with
:func:`paligemma_xray.model.load` in a FRESH process per case, measuring resident memory
after importing torch and transformers (the baseline) and at its peak. JSON out.

    .venv/bin/python benchmarks/load_memory.py --out benchmarks/results/load_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import write_result

_LOAD = r"""
import json, os, resource, sys, time
import torch, transformers  # imported before the baseline: the increment is the checkpoint's
from paligemma_xray.model import load

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmRSS"))

path, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "-" else None)
baseline = rss()
start = time.perf_counter()
model, _ = load(path, dtype=dtype, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak, "model_bytes": model_bytes,
                  "seconds": round(seconds, 2)}))
"""


def write_checkpoint(path: Path, dtype: str, width: int, depth: int, mlp_dim: int) -> None:
    import numpy as np
    import torch

    from paligemma_xray.model.bigvision import NpzWriter, bv_key, families, iter_layers, to_numpy
    from paligemma_xray.model.tiny import tiny_dims, tiny_tokenizer

    dims = tiny_dims(
        1, width=width, depth=depth, heads=8, kv_heads=1, head_dim=128, mlp_dim=mlp_dim,
        vision_width=384, vision_depth=6, vision_heads=6, vision_mlp_dim=1536, image_size=224,
    )  # fmt: skip
    rng = np.random.default_rng(0)

    def random_array(shape):
        return to_numpy(torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02), dtype)

    with NpzWriter(path) as writer:
        for family in families(dims, False):
            shape = family.shape(dims)
            if family.per_layer:
                count = len(list(iter_layers(family, dims)))
                writer.write_layers(bv_key(family), count, (random_array(shape) for _ in range(count)))
            else:
                writer.write(bv_key(family), random_array(shape))
    tiny_tokenizer(path.parent / "paligemma_tokenizer.model")


def measure(path: Path, load_dtype: str | None) -> dict:
    """One load of ``path`` (an npz, or an HF folder) in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), load_dtype or "-"],
        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    size = (
        path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*.safetensors"))
    )
    added = figures["peak_bytes"] - figures["baseline_bytes"]
    return {
        **figures,
        "file_bytes": size,
        "load_dtype": load_dtype or "as stored",
        "added_over_file": round(added / size, 3),
        "added_over_model": round(added / figures["model_bytes"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=1024, help="decoder width (default 1024: 1.3 GB f32)")
    parser.add_argument("--depth", type=int, default=12, help="decoder layers (default 12)")
    parser.add_argument("--mlp-dim", type=int, default=8192, help="decoder MLP width (default 8192)")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()

    cases = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        # float16 → bfloat16: what inference on a bf16 CPU does with the seed's f16 files.
        for stored, loaded in (
            ("float32", None), ("float32", "bfloat16"), ("bfloat16", None), ("float16", "bfloat16")
        ):  # fmt: skip
            path = Path(tmp) / stored / "model.npz"
            if not path.exists():
                path.parent.mkdir(parents=True)
                write_checkpoint(path, stored, args.width, args.depth, args.mlp_dim)
            cases.append({"stored": stored, "form": "npz", **measure(path, loaded)})
        # The same float16 weights as an HF folder (transformers' loader), loaded in bfloat16.
        from paligemma_xray.model import convert

        hf = convert(Path(tmp) / "float16" / "model.npz", Path(tmp) / "float16-hf", progress=False)
        cases.append({"stored": "float16", "form": "hf", **measure(hf, "bfloat16")})
    result = {
        "benchmark": "load_memory",
        "target": "peak memory added by the load <= ~1.5x the checkpoint file",
        "cases": cases,
        "worst_added_over_file": max(case["added_over_file"] for case in cases),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
