"""The seed's path at real size, through the CLI as a user runs it: time, peak memory, bytes.

Writes random checkpoints with the published shapes and dtypes, with a SentencePiece file
of the real tokenizer's layout (257,152 pieces) beside each:

- ``pg1-224-f16``: PaliGemma 1 3B at 224 px, float16 (``paligemma-3b-pt-224.f16.npz``,
  5.85 GB): SigLIP So400m/14 + Gemma 2B (width 2048, 18 layers, 8 heads, 1 KV head);
- ``pg2-448-bf16``: PaliGemma 2 3B at 448 px, bfloat16 (Gemma 2 2B: width 2304, 26 layers,
  8 heads, 4 KV heads, MLP 9216; 1024 image tokens).

The checkpoint is generated and written layer by layer (``NpzWriter``), so building it
needs one layer's memory, not the file's. Then, each in a fresh process
(``python -m paligemma_xray.cli …``): ``train`` big-vision and lora (2 steps, batch 1),
``evaluate`` and ``predict`` on 2 images, ``serve`` with one ``/v1/detect`` request,
``convert`` of the run back to ``.npz``. Per phase: wall time, peak RSS (the process's
``ru_maxrss``), bytes written; the converted ``.npz`` is checked to have the input's
keys, shapes and dtypes, and the run folder's size is reported against the base file's
(target: at most 1.5×). Needs disk for about 3× the checkpoint and RAM for about 2.5×.

    .venv/bin/python benchmarks/real_size.py --models pg1-224-f16 --workdir /tmp/rs \\
        --out benchmarks/results/real_size.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from _common import PALIGEMMA1_3B_224, write_result

from paligemma_xray.model.bigvision import Dims
from paligemma_xray.model.tiny import tiny_dims

PALIGEMMA2_3B_448 = Dims(
    version=2, vocab=PALIGEMMA1_3B_224.vocab, width=2304, depth=26, heads=8, kv_heads=4,
    head_dim=256, mlp_dim=9216, vision_width=1152, vision_depth=27, vision_heads=16,
    vision_mlp_dim=4304, patch=14, image_size=448,
)  # fmt: skip
MODELS = {
    "pg1-224-f16": (PALIGEMMA1_3B_224, "float16"),
    "pg2-448-bf16": (PALIGEMMA2_3B_448, "bfloat16"),
    # Tiny widths, real vocabulary: checks the script itself in a minute.
    "smoke": (tiny_dims(2, vocab_size=PALIGEMMA1_3B_224.vocab, image_size=224), "bfloat16"),
}

# Runs one CLI command in this process and reports its peak RSS on the last stderr line.
_WRAPPER = r"""
import json, resource, sys
from paligemma_xray.cli import main
code = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("\n" + json.dumps({"rc": code, "peak_rss_bytes": peak}), file=sys.stderr)
sys.exit(code)
"""


def write_random_checkpoint(path: Path, dims: Dims, dtype: str, seed: int = 0) -> int:
    """A random big_vision ``.npz`` with ``dims``' exact keys and shapes, one layer in memory.

    Values ~ N(0, 0.02²) (norm scales at their neutral value), enough to run every verb; not
    a trained model. Returns the file size.
    """
    import numpy as np
    import torch

    from paligemma_xray.model.bigvision import NpzWriter, bv_key, families, iter_layers, to_numpy

    rng = np.random.default_rng(seed)

    def array(family):
        values = rng.standard_normal(family.shape(dims), dtype=np.float32)
        values *= 0.02
        if family.bv.endswith("scale") and family.tower == "img":
            values += 1.0
        return to_numpy(torch.from_numpy(values), dtype)

    path.parent.mkdir(parents=True, exist_ok=True)
    with NpzWriter(path) as writer:
        for family in families(dims, dims.kv_heads == dims.heads):
            if family.per_layer:
                count = len(list(iter_layers(family, dims)))
                writer.write_layers(bv_key(family), count, (array(family) for _ in range(count)))
            else:
                writer.write(bv_key(family), array(family))
    return path.stat().st_size


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _phase(name: str, args: list[str], outputs: list[Path], env: dict) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, env=env
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tail = result.stderr.strip().splitlines()
    try:
        figures = json.loads(tail[-1])
    except (IndexError, json.JSONDecodeError):
        figures = {"rc": result.returncode, "peak_rss_bytes": None}
    record = {
        "phase": name,
        "rc": figures["rc"],
        "seconds": round(seconds, 1),
        "peak_rss_gb": figures["peak_rss_bytes"] and round(figures["peak_rss_bytes"] / 1e9, 2),
        "bytes_written": sum(_size(p) for p in outputs),
    }
    if figures["rc"] != 0:
        record["stderr_tail"] = tail[-8:]
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def _serve_phase(model: Path, image: Path, env: dict) -> dict:
    """``serve`` in a subprocess: time until /healthz answers, one /v1/detect, then stop."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", _WRAPPER, "serve", "--model", str(model), "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    record: dict = {"phase": "serve"}
    try:
        while True:
            if server.poll() is not None:
                record.update(rc=server.returncode, stderr_tail=server.stderr.read().splitlines()[-8:])
                return record
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        record["ready_seconds"] = round(time.perf_counter() - start, 1)
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + image.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/detect", data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        record.update(rc=0, request_seconds=round(time.perf_counter() - t, 1), answer_keys=sorted(answer))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def _arrays(path: Path) -> dict:
    from paligemma_xray.model.bigvision import NpzArrays

    with NpzArrays(path) as arrays:
        return {key: (arrays.shape(key), arrays.dtype_name(key)) for key in arrays.keys()}  # noqa: SIM118


def run_model(name: str, workdir: Path, threads: int) -> dict:
    from paligemma_xray.data.synth import generate
    from paligemma_xray.model.tiny import real_layout_tokenizer

    dims, dtype = MODELS[name]
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    npz = root / "base" / f"{name}.npz"
    t = time.perf_counter()
    size = write_random_checkpoint(npz, dims, dtype)
    spm = real_layout_tokenizer(npz.parent / "paligemma_tokenizer.model")
    write_seconds = round(time.perf_counter() - t, 1)
    # 14 images: 9 train, 2 valid, 3 test; at the model's resolution.
    data = generate(root / "data", n=14, seed=0, size=dims.image_size, progress=False)
    images = sorted((data / "dataset").glob("*.jpg"))[:2]
    phases = []
    for recipe in ("big-vision", "lora"):
        run = root / f"run-{recipe}"
        phases.append(_phase(f"train {recipe}", [
            "train", "--model", str(npz), "--tokenizer", str(spm), "--data", str(data), "--out", str(run),
            "--recipe", recipe, "--examples", "2", "--batch-size", "1", "--eval-every", "2",
            "--eval-max-new-tokens", "8", "--eval-batch-size", "2", "--no-progress",
        ], [run], env))  # fmt: skip
        phases[-1]["run_folder_over_base"] = round(_size(run) / size, 3)
        phases[-1]["run_folder"] = {p.name: _size(p) for p in sorted(run.iterdir())} if run.exists() else {}
    run = root / "run-big-vision"
    common = ["--model", str(run), "--batch-size", "2", "--max-new-tokens", "16"]
    phases.append(_phase("evaluate (2 test images)", [
        "evaluate", *common, "--data", str(data), "--split", "test", "--out", str(root / "eval"),
        "--bootstrap", "0",
    ], [root / "eval"], env))  # fmt: skip
    phases.append(_phase("predict (2 images)", [
        "predict", *common, *map(str, images), "--out", str(root / "pred"),
    ], [root / "pred"], env))  # fmt: skip
    phases.append(_serve_phase(run, images[0], env))
    back = root / "back" / "model.npz"
    phases.append(
        _phase("convert run -> npz", ["convert", str(run), str(back), "--dtype", dtype], [back], env)
    )
    same = back.is_file() and _arrays(back) == _arrays(npz)
    back_last = root / "back-last" / "model.npz"
    convert = ["convert", str(run / "last"), str(back_last)]  # the full HF folder: default dtype
    phases.append(_phase("convert last/ -> npz", convert, [back_last], env))
    same = same and back_last.is_file() and _arrays(back_last) == _arrays(npz)
    result = {
        "model": name,
        "dtype": dtype,
        "checkpoint_bytes": size,
        "checkpoint_write_seconds": write_seconds,
        "threads": threads,
        "phases": phases,
        "convert_same_keys_shapes_dtypes": same,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["pg1-224-f16"])
    parser.add_argument(
        "--workdir", type=Path, required=True, help="scratch folder (about 3x the checkpoint)"
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per phase (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args()
    import torch

    results = []
    for name in args.models:
        try:
            results.append(run_model(name, args.workdir, args.threads))
        finally:
            if not args.keep:
                shutil.rmtree(args.workdir / name, ignore_errors=True)
    write_result(
        {
            "benchmark": "real_size",
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "target": "every phase rc 0; run folder <= 1.5x the base checkpoint; convert peak <= 1.2x "
            "max(input, output); converted npz has the input's keys, shapes and dtypes",
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
