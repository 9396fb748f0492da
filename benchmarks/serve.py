"""The HTTP service under load: dynamic batching on against off, same model, same requests.

    python benchmarks/serve.py --out benchmarks/results/serve.json                # tiny model, CPU
    python benchmarks/serve.py --model runs/x/best --clients 32 --out serve.json  # a real checkpoint

One detector is loaded once and served twice on a loopback port, by the real app
(:func:`paligemma_xray.serve.create_app` under uvicorn):

- ``batched``: ``--max-batch`` (default 8) images per model call, ``--max-wait-ms`` (10);
- ``unbatched``: ``max_batch=1`` — every request is its own model call.

``--clients`` concurrent clients (closed loop: each sends its next request when the previous
one is answered) send ``--requests`` uploads each (synthetic PNG radiographs), after a short
warm-up. Reported per mode: requests/s, latency p50/p95/p99/max (ms, client side, upload to
JSON), model calls, mean batch size, errors. ``speedup`` is batched over unbatched requests/s.

Without ``--model`` a tiny random PaliGemma 1 is written to a temporary folder
(``--image-size`` px input, default 224: 256 image tokens as in the real 224 model) and
decoded with plain greedy decoding, so that every request decodes exactly
``--max-new-tokens`` tokens: a fixed amount of model work per image (a random model under
"emit a box or stop" would stop at once). Client and server share this process (the server
in a thread); both modes pay that equally.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from _common import write_result
from PIL import Image, ImageDraw

from paligemma_xray.infer import Detector
from paligemma_xray.serve import ServeConfig, ServerThread, create_app


def synthetic_png(seed: int, width: int = 320, height: int = 256) -> bytes:
    """A grayscale 'radiograph' (noise, a bright bone, a dark crack) as PNG bytes."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.normal(30, 8, (height, width)).clip(0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(image)
    x = int(rng.integers(40, width - 120))
    draw.rectangle([x, 20, x + 60, height - 20], fill=210)
    draw.line([x, height // 2, x + 60, height // 2 - 12], fill=40, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _load(url: str, images: list[bytes], clients: int, requests: int, timeout_s: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client(http: httpx.AsyncClient, index: int) -> None:
        for k in range(requests):
            data = images[(index * requests + k) % len(images)]
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/detect", files={"file": ("x.png", data, "image/png")})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == "200":
                latencies.append(time.perf_counter() - started)
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http, i) for i in range(clients))), timeout_s)
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed_s": elapsed}


def run_mode(detector: Detector, config: ServeConfig, args: argparse.Namespace, images: list[bytes]) -> dict:
    """Serve ``detector`` with ``config``; warm up; measure one closed-loop load."""
    app = create_app(detector, config)
    with ServerThread(app) as server:
        asyncio.run(
            _load(server.url, images, clients=min(4, args.clients), requests=2, timeout_s=args.timeout)
        )
        before = httpx.get(f"{server.url}/healthz").json()["batching"]
        load = asyncio.run(_load(server.url, images, args.clients, args.requests, args.timeout))
        after = httpx.get(f"{server.url}/healthz").json()["batching"]
    latencies_ms = [s * 1000 for s in load["latencies"]]
    calls = after["model_calls"] - before["model_calls"]
    done = after["images"] - before["images"]
    return {
        "max_batch": config.max_batch,
        "max_wait_ms": config.max_wait_ms,
        "requests": args.clients * args.requests,
        "ok": len(latencies_ms),
        "errors": load["errors"],
        "elapsed_s": round(load["elapsed_s"], 3),
        "requests_per_s": round(len(latencies_ms) / load["elapsed_s"], 3),
        "latency_ms": {
            "p50": round(percentile(latencies_ms, 50), 2),
            "p95": round(percentile(latencies_ms, 95), 2),
            "p99": round(percentile(latencies_ms, 99), 2),
            "max": round(max(latencies_ms), 2) if latencies_ms else None,
            "mean": round(statistics.fmean(latencies_ms), 2) if latencies_ms else None,
        },
        "model_calls": calls,
        "mean_batch_size": round(done / calls, 3) if calls else None,
        "model_seconds": round(after["model_seconds"] - before["model_seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint (HF folder or .npz); default: a tiny random model")
    parser.add_argument("--image-size", type=int, default=224, help="tiny model input size (default 224)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    parser.add_argument("--max-batch", type=int, default=8, help="batched mode: images per call (default 8)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="batched mode: max wait (default 10)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="tokens decoded per image (default 16)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each load phase, seconds")
    parser.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_path, model_name, greedy = Path(args.model), str(args.model), False
        else:
            from paligemma_xray.model.tiny import write_tiny_hf

            model_path = write_tiny_hf(Path(tmp) / "tiny", version=1, seed=0, image_size=args.image_size)
            model_name, greedy = f"tiny random PaliGemma 1, {args.image_size} px", True
        # box_or_stop off for the random model: every image decodes max_new_tokens tokens.
        detector = Detector.load(model_path, device=args.device, box_or_stop=not greedy)
        detector.model_id = model_name
        images = [synthetic_png(seed) for seed in range(32)]
        results = {}
        for mode, max_batch, wait in [
            ("batched", args.max_batch, args.max_wait_ms),
            ("unbatched", 1, 0.0),
        ]:
            config = ServeConfig(
                max_batch=max_batch,
                max_wait_ms=wait,
                queue=max(64, args.clients * 2),
                max_new_tokens=args.max_new_tokens,
            )
            results[mode] = run_mode(detector, config, args, images)
            print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr)

    report = {
        "benchmark": "serve",
        "model": model_name,
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "plain_greedy": greedy,
        "results": results,
        "speedup_requests_per_s": round(
            results["batched"]["requests_per_s"] / results["unbatched"]["requests_per_s"], 3
        ),
        "p50_latency_ratio": round(
            results["batched"]["latency_ms"]["p50"] / results["unbatched"]["latency_ms"]["p50"], 3
        ),
    }
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
