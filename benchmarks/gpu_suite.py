"""Every GPU path once, each timed against its baseline in the same process: one command, JSON out.

    python benchmarks/gpu_suite.py --preset pg1-3b-224 --out gpu_suite.json   # one H100/H200, < 8 min
    python benchmarks/gpu_suite.py --preset tiny --out gpu_suite_cpu.json     # CPU, seconds (CI runs it)

Random weights of the real shapes (``pg1-3b-224``: PaliGemma 1 3B at 224 px, from
``_common.PALIGEMMA1_3B_224``) or tiny ones; nothing is downloaded. Cases (``--cases`` picks):

- ``train``: for ``big-vision``, ``lora`` and ``frozen-vision``, our training step (suffix-only
  chunked loss; ``ours_cached``: image features from the cache) against the plain
  ``model(**batch, labels=…)`` step, same trainable weights, optimiser and precision
  (:func:`train_step.compare_steps`): examples/s, peak memory, FLOPs per step with their
  formula, and MFU where the card's bf16 peak is known;
- ``decode``: ``Detector`` against ``generate`` at batch 1, 8 and 32, the same tokens
  asserted (:func:`decode.compare_decoding`): latency, images/s, speedup;
- ``attention``: decoding with the fused SDPA kernel against eager attention (the
  ``--attention`` switch), the same tokens asserted;
- ``predict``: ``predict`` end to end over synthetic radiographs written as JPEG (decoding,
  annotated PNGs and JSON included), images decoded on the main thread (``workers=0``, the
  old way) and in loading threads: images/s, the share of the wall time the model computes
  (``model_busy``; the target is >= 0.8 on GPU) and the time it waited for decoded images;
- ``qlora``: one step of the ``qlora`` recipe (4-bit NF4 base: bitsandbytes' CUDA or CPU
  kernels; skipped with the reason where bitsandbytes is missing);
- ``resume``: a short training run (tiny model, bf16 on CUDA and CPU alike) resumed from
  its middle checkpoint ends with bit-identical weights;
- ``profile``: where the time of one ``big-vision`` training step (ours) and one decoding
  batch goes: the top operators by self device time (torch.profiler), to say why a missed
  target was missed;
- ``fsdp``: one bf16 step of our training module sharded as ``distributed: fsdp`` shards
  it (``train.sharding``: FSDP2, frozen bf16 and trained float32 weights in the same
  layers) in ONE process (NCCL on CUDA, gloo on CPU), against the unsharded step.

Each case is recorded as ``{"status": "ok" | "skipped" | "failed", ...}``; the JSON is
rewritten after every case, so a run stopped at its time limit keeps what it measured.
``--budget-s`` skips the cases that would start after that many seconds. Exit status 1
when a case failed or an asserted invariant (same tokens, bit-identical resume) does not
hold.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _common import PALIGEMMA1_3B_224, TEXT_VOCAB, write_result
from decode import build as build_decode_model
from decode import compare_decoding
from train_step import Memory, build_model, compare_steps, peak_flops

from paligemma_xray.errors import ConfigError
from paligemma_xray.model.tiny import tiny_dims

# What each preset runs: model sizes and how much work each case does.
PRESETS = {
    "tiny": {
        "train_dims": tiny_dims(1, vocab_size=TEXT_VOCAB),  # real 257,216-row head, 4 image tokens
        "decode_model": "tiny",
        "batch_size": 2,
        "steps": 1,
        "warmup": 1,
        "decode_batches": (1, 8, 32),
        "new_tokens": 6,
        "repeats": 1,
        "predict_images": 12,
        "predict_size": 224,
        "predict_batch": 4,
        "predict_tokens": 8,
        "resume_examples": 8,
        "resume_batch": 2,
    },
    "pg1-3b-224": {
        "train_dims": PALIGEMMA1_3B_224,
        "decode_model": "pg1-3b-224",
        "batch_size": 8,
        "steps": 5,
        "warmup": 2,
        "decode_batches": (1, 8, 32),
        "new_tokens": 32,
        "repeats": 3,
        "predict_images": 256,
        "predict_size": 448,
        "predict_batch": 32,
        "predict_tokens": 16,
        "resume_examples": 32,
        "resume_batch": 8,
    },
}
CASES = ("train", "decode", "attention", "predict", "qlora", "resume", "profile", "fsdp")
TRAIN_RECIPES = ("big-vision", "lora", "frozen-vision")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# cases


def case_train(p: dict, device: torch.device) -> dict:
    """Ours vs the plain step for each recipe (model rebuilt per recipe: memory is per case)."""
    out: dict = {"recipes": {}}
    for recipe in TRAIN_RECIPES:
        model, config, bf16 = build_model(p["train_dims"], device, recipe)
        out["recipes"][recipe] = compare_steps(
            model, config, p["train_dims"], device, bf16,
            batch_size=p["batch_size"], steps=p["steps"], warmup=p["warmup"],
        )  # fmt: skip
        del model
        _free(device)
    big = out["recipes"]["big-vision"]
    cached_mfu = out["recipes"]["frozen-vision"]["cases"]["ours_cached"]["mfu"]
    out["targets"] = {
        "big_vision_speedup_ge_2": big["speedup_ours"] >= 2,
        "big_vision_memory_ratio_le_0_6": big["memory_ratio_ours"] <= 0.6,
        "frozen_vision_cached_mfu_ge_0_4": None if cached_mfu is None else cached_mfu >= 0.4,
    }
    return out


def case_decode(p: dict, device: torch.device, decode_model) -> dict:
    model, processor = decode_model
    runs = {}
    for batch in p["decode_batches"]:
        runs[str(batch)] = compare_decoding(
            model, processor, batch_size=batch, new_tokens=p["new_tokens"], repeats=p["repeats"],
            device=str(device),
        )  # fmt: skip
    same = all(r["same_tokens_as_generate"] for r in runs.values())
    largest = runs[str(max(p["decode_batches"]))]
    return {
        "batches": runs,
        "same_tokens_as_generate": same,
        "invariants_hold": same,
        "targets": {"speedup_ge_3_at_largest_batch": largest["speedup"] >= 3},
    }


def case_attention(p: dict, device: torch.device, decode_model) -> dict:
    """The fused kernel (SDPA, the default) against eager attention, same model and batch."""
    import numpy as np
    from PIL import Image

    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.detector import set_attention

    model, processor = decode_model
    batch = 8
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(batch)]
    detector = Detector(model, processor, box_or_stop=False, batch_size=batch)
    results, tokens = {}, {}
    try:
        for kernel in ("eager", "sdpa"):
            set_attention(model, kernel)
            detector.generate(images, "detect fracture", max_new_tokens=p["new_tokens"])  # warm-up
            times = []
            for _ in range(max(1, p["repeats"])):
                _sync(device)
                start = time.perf_counter()
                answers = detector.generate(images, "detect fracture", max_new_tokens=p["new_tokens"])
                _sync(device)
                times.append(time.perf_counter() - start)
            tokens[kernel] = [g.tokens for g in answers]
            median = sorted(times)[len(times) // 2]
            results[kernel] = {"latency_s": round(median, 5), "images_per_s": round(batch / median, 3)}
    finally:
        set_attention(model, "sdpa")
    same = tokens["sdpa"] == tokens["eager"]
    return {
        "batch": batch,
        "new_tokens": p["new_tokens"],
        "kernels": results,
        "sdpa_speedup": round(results["eager"]["latency_s"] / results["sdpa"]["latency_s"], 3),
        "same_tokens": same,
        "invariants_hold": same,
    }


@contextlib.contextmanager
def _timed_model_calls(device: torch.device):
    """Time every ``greedy_decode`` the Detector makes (the model's share of a predict run)."""
    from paligemma_xray.infer import detector as detector_module

    original = detector_module.greedy_decode
    spent = {"s": 0.0, "calls": 0}

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            spent["s"] += time.perf_counter() - start
            spent["calls"] += 1

    detector_module.greedy_decode = timed
    try:
        yield spent
    finally:
        detector_module.greedy_decode = original


def case_predict(p: dict, device: torch.device, decode_model, work: Path) -> dict:
    """``predict`` over synthetic JPEG radiographs: images decoded inline vs in threads."""
    from paligemma_xray.data.synth import generate
    from paligemma_xray.infer import Detector
    from paligemma_xray.infer.predict import predict
    from paligemma_xray.infer.prefetch import default_workers
    from paligemma_xray.infer.settings import PredictSettings

    model, processor = decode_model
    start = time.perf_counter()
    # Rendering a radiograph costs more than decoding it: at most 32 distinct ones, each
    # written under several names (every file is still read and decoded on its own).
    unique = min(p["predict_images"], 32)
    root = work / f"synth-{unique}-{p['predict_size']}"
    if not (root / "dataset").is_dir():  # a --work folder kept from an earlier run is reused
        generate(root, n=unique, seed=0, size=p["predict_size"], progress=False)
    synth_s = time.perf_counter() - start
    sources = sorted((root / "dataset").glob("*.jpg"))
    folder = work / f"predict-inputs-{p['predict_images']}-{p['predict_size']}"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(p["predict_images"]):
            shutil.copyfile(sources[i % len(sources)], folder / f"{i:04d}-{sources[i % len(sources)].name}")
    detector = Detector(model, processor, batch_size=p["predict_batch"])
    try:
        import supervision  # noqa: F401

        annotated = True
    except ImportError:
        annotated = False  # the PNGs need supervision; a device without it times the rest
    # A warm-up on a few images (kernels, allocator) so that neither run pays it.
    first = sorted(folder.glob("*.jpg"))[: p["predict_batch"]]  # warm-up on one batch

    def settings(paths: list, out: Path, workers: int, pngs: bool) -> PredictSettings:
        return PredictSettings(
            paths=[str(x) for x in paths], out=str(out), max_new_tokens=p["predict_tokens"],
            batch_size=detector.batch_size, workers=workers, images=pngs,
        )  # fmt: skip

    predict(detector, settings(first, work / "warm", 0, False), progress=False)
    runs = {}
    # inline: images decoded on the main thread (before); threads: in loading threads
    # (after); threads_no_png: the same without annotated PNGs, to show what writing costs.
    plans = [("inline", 0, annotated), ("threads", default_workers(), annotated)]
    if annotated:
        plans.append(("threads_no_png", default_workers(), False))
    for label, workers, pngs in plans:
        out = work / f"predict-{label}"
        with _timed_model_calls(device) as model_time:
            start = time.perf_counter()
            summary = predict(detector, settings([folder], out, workers, pngs), progress=False)
            wall = time.perf_counter() - start
        runs[label] = {
            "workers": workers,
            "annotated_pngs": pngs,
            "images": summary["predicted"],
            "wall_s": round(wall, 4),
            "images_per_s": round(summary["predicted"] / wall, 3),
            "model_s": round(model_time["s"], 4),
            "model_busy": round(model_time["s"] / wall, 4),
            "input_wait_s": round(summary["input_wait_s"], 4),
            "input_wait_share": round(summary["input_wait_s"] / wall, 4),
            "output_wait_s": round(summary.get("output_wait_s", 0.0), 4),
            "other_s": round(
                wall - model_time["s"] - summary["input_wait_s"] - summary.get("output_wait_s", 0.0), 4
            ),
        }
        shutil.rmtree(out, ignore_errors=True)
    return {
        "images": p["predict_images"],
        "image_size": p["predict_size"],
        "image_format": "jpg",
        "batch_size": p["predict_batch"],
        "max_new_tokens": p["predict_tokens"],
        "annotated_pngs": annotated,
        "distinct_images": unique,
        "synthesis_s": round(synth_s, 3),
        "runs": runs,
        "speedup_threads": round(runs["threads"]["images_per_s"] / runs["inline"]["images_per_s"], 3),
        "note": "model_busy = time inside greedy_decode (CUDA-synchronised) / wall time; "
        "input_wait_s / output_wait_s: the main thread blocked on decoded images / on the writer "
        "threads (with workers=0 both are the whole decoding / writing time); other_s: the rest "
        "(preprocessing to the model's resolution, parsing, bookkeeping)",
        "targets": {"model_busy_ge_0_8": runs["threads"]["model_busy"] >= 0.8},
    }


def case_qlora(p: dict, device: torch.device) -> dict:
    """One step of the qlora recipe (NF4 base, LoRA adapters, activation checkpointing)."""
    try:
        model, config, bf16 = build_model(p["train_dims"], device, "qlora")
    except ConfigError as error:  # bitsandbytes missing
        return {"status": "skipped", "reason": str(error)}
    result = compare_steps(
        model, config, p["train_dims"], device, bf16, batch_size=p["batch_size"], steps=1, warmup=1,
        cases=("ours",),
    )  # fmt: skip
    for case in result["cases"].values():  # packed 4-bit weights count half their elements
        case["mfu"] = None
    result["mfu_note"] = "not reported: 4-bit weights are counted as packed elements"
    del model
    _free(device)
    finite = all(torch.isfinite(torch.tensor(c["last_loss"])) for c in result["cases"].values())
    return {**result, "loss_finite": finite, "invariants_hold": finite}


def _tiny_run_inputs(work: Path) -> tuple[Path, Path]:
    from paligemma_xray.data.synth import generate
    from paligemma_xray.model.tiny import write_tiny_hf

    data = work / "resume-data"
    if not data.exists():
        generate(data, n=16, seed=1, size=112, progress=False)
    model = work / "tiny-hf"
    if not model.exists():
        write_tiny_hf(model, version=1, seed=0)
    return model, data


def case_resume(p: dict, device: torch.device, work: Path) -> dict:
    """A run resumed from its middle checkpoint ends bit-identical to the uninterrupted one."""
    from safetensors.torch import load_file

    from paligemma_xray.train import from_run, resolve, run

    model, data = _tiny_run_inputs(work)
    precision = "bf16"  # the device path, on the CPU too
    steps = p["resume_examples"] // p["resume_batch"]
    overrides = {
        "model": str(model), "data": str(data), "examples": p["resume_examples"],
        "batch_size": p["resume_batch"], "checkpoint_every": steps // 2, "keep_last": 3,
        "eval_every": steps, "eval_decode": False, "progress": False, "precision": precision,
        "device": device.type,
    }  # fmt: skip
    start = time.perf_counter()
    whole = run(resolve("lora", overrides={**overrides, "out": str(work / "run-whole")}))
    whole_s = time.perf_counter() - start
    cut = work / "run-cut"
    run(resolve("lora", overrides={**overrides, "out": str(cut)}))
    # Interrupted after the middle checkpoint: what came later never happened.
    for later in (cut / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > steps // 2:
            shutil.rmtree(later)
    shutil.rmtree(cut / "last")
    (cut / "summary.json").unlink()
    start = time.perf_counter()
    resumed = run(from_run(cut), resume=True)
    resumed_s = time.perf_counter() - start

    final = f"checkpoints/step-{steps}/trainable.safetensors"
    expected, got = load_file(work / "run-whole" / final), load_file(cut / final)
    different = [k for k in expected if k not in got or not torch.equal(expected[k], got[k])]
    identical = not different and expected.keys() == got.keys()
    return {
        "recipe": "lora",
        "model": "tiny (a resume is about the state saved, not the size)",
        "precision": precision,
        "steps": steps,
        "resumed_from_step": steps // 2,
        "final_loss": {"uninterrupted": whole.final_loss, "resumed": resumed.final_loss},
        "seconds": {"uninterrupted": round(whole_s, 3), "resumed_half": round(resumed_s, 3)},
        "trainable_tensors": len(expected),
        "bit_identical": identical,
        "different_tensors": different[:5],
        "invariants_hold": identical and whole.final_loss == resumed.final_loss,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def case_fsdp(p: dict, device: torch.device, work: Path) -> dict:
    """One bf16 step of the training module sharded as the loop shards it (FSDP2) in one
    process, against the same step unsharded: same loss, same updated weights."""
    from paligemma_xray.model import load
    from paligemma_xray.train import sharding
    from paligemma_xray.train.batches import Augment, Examples
    from paligemma_xray.train.loop import _load_image, _optimizer, _records, _StepModule
    from paligemma_xray.train.recipes import resolve
    from paligemma_xray.train.strategies import prepare_model

    model_dir, data = _tiny_run_inputs(work)
    config = resolve(
        "big-vision",
        overrides={"model": str(model_dir), "data": str(data), "out": str(work / "fsdp"), "batch_size": 4,
                   "progress": False},
    )  # fmt: skip
    bf16 = True  # frozen bf16 + trained float32 in one layer: what FSDP1 could not flatten
    base, processor = load(config.model, progress=False)
    records, _ = _records(config)
    examples = Examples(records, Augment(), config.seed, _load_image)
    batch, _ = examples.batch(list(range(config.batch_size)), processor, config.max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    first_location = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def one_step(module, params) -> float:
        optimizer = _optimizer(config, params)
        with autocast:
            loss, _, _ = module(batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    reference_model = prepare_model(copy.deepcopy(base), config, device, bf16)
    reference = _StepModule(reference_model, config, first_location)
    reference_loss = one_step(reference, [q for q in reference.parameters() if q.requires_grad])
    expected = {n: q.detach().float().cpu() for n, q in reference_model.named_parameters() if q.requires_grad}
    del reference, reference_model
    _free(device)

    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = prepare_model(base, config, device, bf16)
        sharded = sharding.shard(_StepModule(model, config, first_location))
        memory = Memory(device)
        memory.reset()
        start = time.perf_counter()
        loss = one_step(sharded, [q for q in sharded.parameters() if q.requires_grad])
        _sync(device)
        seconds = time.perf_counter() - start
        # Gathered whole, as the loop's checkpoints take them.
        got = {n: t.float().cpu() for n, t in sharding.trainable_state(model).items()}
        dtypes = sorted({str(q.dtype) for q in model.parameters()})
    finally:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
    max_diff = max((float((got[n] - expected[n]).abs().max()) for n in expected if n in got), default=None)
    close = got.keys() == expected.keys() and max_diff is not None and max_diff <= 1e-3
    return {
        "model": "tiny (the path, not the size: one process holds every shard)",
        "sharding": f"FSDP2 fully_shard, {backend}",
        "precision": "bf16 autocast",
        "parameter_dtypes": dtypes,
        "loss": {"fsdp": loss, "unwrapped": reference_loss},
        "seconds_per_step": round(seconds, 4),
        "peak_memory_bytes": memory.peak(),
        "max_weight_difference": max_diff,
        "invariants_hold": bool(close and abs(loss - reference_loss) <= 1e-3 * max(1.0, abs(reference_loss))),
    }


def _top_operators(profiler, device: torch.device, n: int = 15) -> list[dict]:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(profiler.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in rows) or 1
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round(getattr(e, key, 0) / 1000, 3),
            "share": round(getattr(e, key, 0) / total, 4),
        }
        for e in rows[:n]
    ]


def case_profile(p: dict, device: torch.device) -> dict:
    """Top operators of one training step (ours, big-vision) and one decoding batch."""
    from torch.profiler import ProfilerActivity, profile
    from train_step import make_batch

    from paligemma_xray.infer import Detector
    from paligemma_xray.train.loss import suffix_loss

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model, _, bf16 = build_model(p["train_dims"], device, "big-vision")
    batch = {k: v.to(device) for k, v in make_batch(p["train_dims"], p["batch_size"], 0).items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(model) -> None:
        with autocast:
            loss = suffix_loss(model, batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(model)  # warm-up
    _sync(device)
    with profile(activities=activities) as train_profile:
        step(model)
        _sync(device)
    del model
    _free(device)
    out = {"train_step_big_vision": _top_operators(train_profile, device)}

    import numpy as np
    from PIL import Image

    decode_model = build_decode_model(
        p["decode_model"], str(device), torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    rng = np.random.default_rng(2)
    batch_size = max(p["decode_batches"])
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(batch_size)]
    detector = Detector(*decode_model, box_or_stop=False, batch_size=batch_size)
    detector.generate(images, "detect fracture", max_new_tokens=p["new_tokens"])  # warm-up
    _sync(device)
    with profile(activities=activities) as decode_profile:
        detector.generate(images, "detect fracture", max_new_tokens=p["new_tokens"])
        _sync(device)
    out[f"decode_batch_{batch_size}"] = _top_operators(decode_profile, device)
    out["time_kind"] = "self device (CUDA) time" if device.type == "cuda" else "self CPU time"
    return out


# --------------------------------------------------------------------------------------
# driver


def _device_info(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "peak_bf16_flops": peak_flops(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny", help="sizes (default: tiny, CPU)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip cases that would start after this many seconds (default 420)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--predict-images", type=int, help="images for the predict case (preset's default)")
    parser.add_argument("--predict-size", type=int, help="their side in pixels (preset's default)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, help="write the JSON result here (also printed)")
    args = parser.parse_args(argv)

    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(PRESETS[args.preset])
    if args.predict_images:
        p["predict_images"] = args.predict_images
    if args.predict_size:
        p["predict_size"] = args.predict_size
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"preset": args.preset, **_device_info(device), "cases": {}}
    t0 = time.perf_counter()
    decode_model = None
    try:
        for name in CASES:
            if name not in wanted:
                continue
            elapsed = time.perf_counter() - t0
            if elapsed > args.budget_s:
                result["cases"][name] = {"status": "skipped", "reason": f"time budget ({elapsed:.0f} s used)"}
                continue
            print(f"[gpu_suite] {name} (at {elapsed:.1f} s)", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                if name in ("decode", "attention", "predict") and decode_model is None:
                    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                    decode_model = build_decode_model(p["decode_model"], str(device), dtype)
                if name not in ("decode", "attention", "predict") and decode_model is not None:
                    decode_model = None  # the 3B inference copy is not needed any more
                    _free(device)
                case = _run_case(name, p, device, decode_model, work)
                case.setdefault("status", "ok")
            except Exception as error:  # one broken path must not cost the others' figures
                case = {
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            case["case_seconds"] = round(time.perf_counter() - start, 3)
            result["cases"][name] = case
            result["total_seconds"] = round(time.perf_counter() - t0, 3)
            if args.out:
                _write_quiet(result, args.out)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, c in result["cases"].items() if c["status"] == "failed"]
    broken = [n for n, c in result["cases"].items() if c.get("invariants_hold") is False]
    result["failed"] = failed
    result["invariants_broken"] = broken
    result["total_seconds"] = round(time.perf_counter() - t0, 3)
    write_result(result, args.out)
    return 1 if failed or broken else 0


def _run_case(name: str, p: dict, device: torch.device, decode_model, work: Path) -> dict:
    if name == "train":
        return case_train(p, device)
    if name == "decode":
        return case_decode(p, device, decode_model)
    if name == "attention":
        return case_attention(p, device, decode_model)
    if name == "predict":
        return case_predict(p, device, decode_model, work)
    if name == "qlora":
        return case_qlora(p, device)
    if name == "resume":
        return case_resume(p, device, work)
    if name == "profile":
        return case_profile(p, device)
    return case_fsdp(p, device, work)


def _write_quiet(result: dict, out: Path) -> None:
    """The JSON so far, without printing it (the final one is printed)."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
