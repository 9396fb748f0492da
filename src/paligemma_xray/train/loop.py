"""The training loop: ``run(config) -> RunSummary``.

One process or many (``torchrun`` / ``accelerate launch`` set RANK/WORLD_SIZE; accelerate
wraps the model in DDP, or FSDP with ``distributed: fsdp``). The whole optimiser step is in
:func:`run`, on one screen; everything around it (data, model, evaluation, checkpoints,
logs) lives in small helpers below.

Run folder::

    config.yaml            the resolved recipe (every field)
    metrics.jsonl          one JSON object per logged step / evaluation
    tb/                    TensorBoard logs
    checkpoints/step-N/    resumable state: trainable weights, optimiser, schedule, RNG
    best/  last/           HF folders that ``paligemma_xray.model.load`` reads
    last/model.npz         big_vision export (``export_npz``)

Every folder is written under a temporary name and renamed when complete, so a run killed
at any moment leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paligemma_xray.errors import ConfigError, DataError, check_output
from paligemma_xray.locations import classes_from_prefix, parse
from paligemma_xray.model.processing import build_batch
from paligemma_xray.train.batches import Augment, Examples, FeatureCache, step_positions
from paligemma_xray.train.loss import image_features, loss_denominator, suffix_loss, unwrap
from paligemma_xray.train.recipes import TrainConfig
from paligemma_xray.train.strategies import (
    count_parameters,
    merged_state_dict,
    prepare_model,
    trainable_state,
    vision_frozen,
)

logger = logging.getLogger(__name__)

# Image-feature caches larger than this stay in host memory.
_CACHE_ON_DEVICE_BYTES = 4 * 2**30
# Issues that mean an object of the output was dropped (see locations.PARSE_ISSUE_KINDS).
_DROPPED = ("truncated", "inverted", "empty_label")


@dataclass
class RunSummary:
    """What :func:`run` returns (also written as ``summary.json``)."""

    run_dir: str
    steps: int
    examples_per_s: float
    final_loss: float | None
    best_metric: str
    best_value: float | None
    best_step: int | None
    last_eval: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    processes: int = 1


class _StepModule(nn.Module):
    """The loss as a module, so that DDP/FSDP see one forward per micro-batch (calling
    ``model.model`` directly would bypass their gradient hooks)."""

    def __init__(self, model: nn.Module, config: TrainConfig, first_location_id: int | None) -> None:
        super().__init__()
        self.model = model
        self.reduction = config.loss
        self.chunk_tokens = config.loss_chunk_tokens
        self.location_sigma = config.location_sigma
        self.first_location_id = first_location_id

    def forward(self, batch, features=None, denominator=None):
        out = suffix_loss(
            self.model,
            batch,
            reduction=self.reduction,
            denominator=denominator,
            chunk_tokens=self.chunk_tokens,
            features=features,
            location_sigma=self.location_sigma,
            first_location_id=self.first_location_id,
        )
        return out.loss, out.token_nll, out.example_index


def run(config: TrainConfig, *, resume: bool = False) -> RunSummary:
    """Train as ``config`` says; ``resume``: continue the run in ``config.out`` exactly."""
    config.validate()
    accelerator = _accelerator(config)
    device, rank, world, main = (
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        (accelerator.is_main_process),
    )
    bf16 = _use_bf16(config, device)
    out = Path(config.out)
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(
            f"batch_size {config.batch_size} must divide by processes × grad_accum"
            f" = {world} × {config.grad_accum}"
        )
    train_records, valid_records = _records(config)
    _prepare_run_dir(out, config, resume, main)

    torch.manual_seed(config.seed)  # same LoRA initialisation on every process and on resume
    base, processor = _load_model(config)
    model = prepare_model(base, config, device, bf16)
    if main and not resume:  # only now: a model or recipe that does not load leaves no run folder
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "config.yaml", config.to_yaml())
    accelerator.wait_for_everyone()
    n_trainable, n_total = count_parameters(model)
    first_location_id = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    step_module = accelerator.prepare_model(_StepModule(model, config, first_location_id))
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = _optimizer(config, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(config, i + 1))

    examples = Examples(train_records, _augment(config), config.seed, _load_image)
    state = {"step": 0, "best_value": None, "best_step": None, "best_metric": "val_loss"}
    if resume:
        state = _load_checkpoint(out, model, optimizer, scheduler, rank)
    cache = _feature_cache(config, model, examples, processor, device, bf16, main)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    logs = _Logs(out, state["step"], config, main)
    steps, start = config.steps, state["step"]
    bar = _progress(config, steps, start, main)
    per_rank = config.batch_size // world
    t_start, loss_value, last_eval = time.perf_counter(), None, {}

    for step in range(start, steps):
        t0 = time.perf_counter()
        # --- build this process's micro-batches; denominator over the GLOBAL batch --------
        micro = [
            examples.batch(pos, processor, config.max_length)
            for pos in step_positions(step, config.batch_size, config.grad_accum, rank, world)
        ]
        denominator = _all_sum(accelerator, sum(loss_denominator(b["labels"], config.loss) for b, _ in micro))
        # DDP averages gradients over processes, hence × world: the sum is over the batch.
        denominator = max(denominator, 1.0) / world
        # --- forward/backward per micro-batch, gradients synchronised on the last one ----
        step_loss = torch.zeros((), device=device)
        for i, (batch, keys) in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            features = cache.get(_features_fn(model), keys, batch["pixel_values"]) if cache else None
            sync = i == len(micro) - 1
            with (
                _oom_guard(config, step),
                contextlib.nullcontext() if sync else accelerator.no_sync(step_module),
            ):
                with autocast:
                    loss, _, _ = step_module(batch, features=features, denominator=denominator)
                accelerator.backward(loss)
            step_loss += loss.detach()
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(trainable, config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # --- bookkeeping ---------------------------------------------------------------
        loss_value = _all_sum(accelerator, float(step_loss)) / world
        rate = per_rank * world / max(time.perf_counter() - t0, 1e-9)
        done = step + 1
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}")
            bar.update(1)
        if done % config.log_every == 0 or done == steps:
            logs.write({"kind": "train", "step": done, "loss": loss_value, "lr": lr, "examples_per_s": rate})
        if valid_records and (done % config.eval_interval == 0 or done == steps):
            last_eval = evaluate(model, processor, valid_records, config, device, bf16, accelerator)
            logs.write({"kind": "eval", "step": done, **last_eval})
            if _improves(last_eval, state):
                state.update(
                    best_step=done,
                    best_metric=_best_key(last_eval),
                    best_value=last_eval[_best_key(last_eval)],
                    best_val_loss=last_eval["val_loss"],
                )
                _save_weights(out / "best", model, processor, config, accelerator, step_module)
        if done % config.checkpoint_interval == 0 or done == steps:
            state["step"] = done
            _save_checkpoint(out, model, optimizer, scheduler, state, config, accelerator, step_module)

    if bar is not None:
        bar.close()
    if start < steps or not (out / "last").exists():
        _save_weights(out / "last", model, processor, config, accelerator, step_module, npz=config.export_npz)
    elapsed = time.perf_counter() - t_start
    summary = RunSummary(
        run_dir=str(out),
        steps=steps,
        examples_per_s=(steps - start) * config.batch_size / elapsed if steps > start else 0.0,
        final_loss=loss_value,
        best_metric=state["best_metric"],
        best_value=state["best_value"],
        best_step=state["best_step"],
        last_eval=last_eval,
        trainable_parameters=n_trainable,
        total_parameters=n_total,
        processes=world,
    )
    if main:
        _atomic_write_text(out / "summary.json", json.dumps(asdict(summary), indent=2))
    logs.close()
    accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------
# schedule and optimiser


def lr_factor(config: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at 1-based optimiser ``step`` (big_vision's schedule).

    Warm-up ``min(1, step / warmup_steps)`` with ``warmup_steps = int(warmup · steps)``;
    then cosine or linear from 1 to 0 at the last step, or constant.
    """
    total = config.steps
    warmup_steps = int(config.warmup * total)
    progress = min(max((step - warmup_steps) / max(total - warmup_steps, 1), 0.0), 1.0)
    if config.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 1.0
    if warmup_steps:
        factor *= min(1.0, step / warmup_steps)
    return factor


def _optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("recipe does not fit the model: nothing to train")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


# ---------------------------------------------------------------------------------------------
# runtime


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda asked for, but no CUDA GPU is visible")
    kwargs: dict[str, Any] = {"cpu": cpu, "mixed_precision": "no"}  # autocast is ours (see run)
    if config.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["fsdp_plugin"] = _fsdp_plugin()
    return Accelerator(**kwargs)


def _fsdp_plugin():
    """accelerate's FSDP settings for ``distributed: fsdp`` (also used by the GPU suite's
    one-process FSDP case). accelerate raises RuntimeError where FSDP has no device (CPU)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["GemmaDecoderLayer", "Gemma2DecoderLayer", "SiglipEncoderLayer"],
        use_orig_params=True,  # frozen and trainable weights share flat parameters
        state_dict_type="FULL_STATE_DICT",
        sync_module_states=True,
    )


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.precision == "bf16":
        if device.type != "cuda":
            raise ConfigError("precision: bf16 needs a CUDA GPU here; use float32 (or auto) on CPU")
        return True
    return config.precision == "auto" and device.type == "cuda"


def _all_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


@contextlib.contextmanager
def _oom_guard(config: TrainConfig, step: int):
    try:
        yield
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError
        raise ConfigError(
            f"out of memory at step {step + 1} (micro-batch {config.batch_size // config.grad_accum}): "
            "raise --grad-accum, turn on --activation-checkpointing, shorten --max-length, "
            "or use --recipe lora / qlora"
        ) from None


def _progress(config: TrainConfig, steps: int, start: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# data and model


def _load_image(path):
    from paligemma_xray.data import load_image

    return load_image(path)


def _records(config: TrainConfig) -> tuple[list, list]:
    from paligemma_xray.data import open_dataset

    dataset = open_dataset(config.data)
    train = dataset.usable(config.train_split)  # DataError naming the data set if missing or empty
    try:
        valid = dataset.records(config.valid_split)
    except DataError:
        valid = []
    if not valid:
        logger.warning("no %r examples in %s: training without evaluation", config.valid_split, config.data)
    for record in [*train, *valid]:
        if not isinstance(record.prefix, str) or not record.prefix.strip():
            raise DataError("example has no prefix (prompt)", path=record.source, line=record.line)
        if not isinstance(record.suffix, str):
            raise DataError("example has no suffix (target)", path=record.source, line=record.line)
    return train, valid


def _load_model(config: TrainConfig):
    from paligemma_xray.model import load

    return load(config.model, tokenizer=config.tokenizer, progress=config.progress, revision=config.revision)


def _augment(config: TrainConfig) -> Augment:
    return Augment(shuffle_objects=config.shuffle_objects, hflip=config.hflip, jitter=config.jitter)


def _features_fn(model: nn.Module):
    return lambda pixels: image_features(model, pixels)


def _feature_cache(config, model, examples: Examples, processor, device, bf16, main) -> FeatureCache | None:
    """Image features of every training record the run will use, computed up front in a
    fixed order, so that a fresh run and a resumed one use bit-identical features."""
    if not (config.cache_image_features and vision_frozen(model) and not examples.augment.changes_pixels):
        return None
    used = sorted({examples.record_index(k) for k in range(config.steps * config.batch_size)})
    core = unwrap(model)
    tokens = (core.config.vision_config.image_size // core.config.vision_config.patch_size) ** 2
    size = len(used) * tokens * core.config.text_config.hidden_size * (2 if bf16 else 4)
    # Large sets (high resolution, many images) stay in host memory, moved per batch.
    cache = FeatureCache(device if size <= _CACHE_ON_DEVICE_BYTES else torch.device("cpu"))
    if main:
        logger.info("caching image features of %d images (%.1f MB)", len(used), size / 2**20)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for s in range(0, len(used), config.eval_batch_size):
        keys = used[s : s + config.eval_batch_size]
        records = [examples.records[i] for i in keys]
        pixels = build_batch(
            processor,
            [_load_image(r.image) for r in records],
            [r.prefix for r in records],
            [r.suffix for r in records],
            max_length=config.max_length,
        )["pixel_values"]
        with autocast:
            cache.get(_features_fn(model), keys, pixels.to(device))
    return cache


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model, processor, records, config: TrainConfig, device, bf16: bool, accelerator
) -> dict[str, Any]:
    """Validation loss (per-example mean, then mean) over ALL ``records``, and with
    ``eval_decode`` the greedy-decoded outputs' parse rate and, when the evaluation module
    is present, COCO mAP. Records are shared out over processes and the results gathered."""
    from paligemma_xray.infer.decode import greedy_decode

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(records), world))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loss_sum, count = 0.0, 0
    results: list[tuple[int, dict, dict]] = []
    eos = processor.tokenizer.eos_token_id
    for s in range(0, len(mine), config.eval_batch_size):
        chunk = [records[i] for i in mine[s : s + config.eval_batch_size]]
        images = [_load_image(r.image) for r in chunk]
        prefixes, suffixes = [r.prefix for r in chunk], [r.suffix for r in chunk]
        batch = build_batch(processor, images, prefixes, suffixes, max_length=config.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            per_example = suffix_loss(model, batch).per_example(len(chunk))
        valid = ~torch.isnan(per_example)
        loss_sum += float(per_example[valid].sum())
        count += int(valid.sum())
        if not config.eval_decode:
            continue
        prompts = build_batch(processor, images, prefixes)
        prompts = {k: v.to(device) for k, v in prompts.items()}
        with autocast:
            decoded = greedy_decode(
                unwrap(model), prompts, max_new_tokens=config.eval_max_new_tokens, eos_token_id=eos
            )
        for j, record in enumerate(chunk):
            size = images[j].size
            classes = classes_from_prefix(record.prefix)
            pieces = _pieces(processor.tokenizer, decoded.tokens[j], eos)
            text = "".join(pieces)
            found = parse(text, size, classes, token_logprobs=list(zip(pieces, decoded.logprobs[j])))
            truth = parse(record.suffix, size, classes)
            ok = decoded.finished[j] and not any(found.parse_issues.get(k, 0) for k in _DROPPED)
            results.append((mine[s + j], {"ok": ok, "pred": found.to_json()}, truth.to_json()))

    metrics: dict[str, Any] = {}
    totals = [loss_sum, count]
    if world > 1:
        t = torch.tensor(totals, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        totals = t.tolist()
    metrics["val_loss"] = totals[0] / max(totals[1], 1)
    if config.eval_decode:
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)
        results.sort(key=lambda r: r[0])
        metrics["parse_rate"] = sum(r[1]["ok"] for r in results) / max(len(results), 1)
        metrics.update(_map(results, records))
    if was_training:
        model.train()
    return metrics


def _pieces(tokenizer, tokens: list[int], eos: int) -> list[str]:
    """Text of each generated token (EOS gives ""), so that the pieces concatenate to the
    decoded text (SentencePiece drops a leading space only at the very start)."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        ids = [t for t in tokens[: i + 1] if t != eos]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        pieces.append(text[len(previous) :] if text.startswith(previous) else "")
        previous = text if text.startswith(previous) else previous
    return pieces


def _map(results, records) -> dict[str, Any]:
    try:
        from paligemma_xray.evaluate import evaluate_detections
    except ImportError:  # evaluation layer absent: loss and parse rate only
        return {}
    from paligemma_xray.locations import Detections

    classes = sorted({c for r in records for c in classes_from_prefix(r.prefix)})
    truths = [Detections.from_json(r[2]) for r in results]
    preds = [Detections.from_json(r[1]["pred"]) for r in results]
    figures = evaluate_detections(truths, preds, classes, bootstrap=0, curves=False)
    return {"map50": figures.get("map50"), "map50_95": figures.get("map50_95")}


def _best_key(metrics: dict[str, Any]) -> str:
    return "map50" if metrics.get("map50") is not None else "val_loss"


def _improves(metrics: dict[str, Any], state: dict[str, Any]) -> bool:
    """Higher mAP wins (ties: lower validation loss, so that an untrained model's constant
    mAP of 0 does not pin best/ to the first evaluation); without mAP, lower loss wins."""
    key = _best_key(metrics)
    value = metrics[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if state["best_value"] is None or state["best_metric"] != key:
        return True
    if key == "map50" and value != state["best_value"]:
        return value > state["best_value"]
    previous_loss = state.get("best_val_loss")
    return previous_loss is None or metrics["val_loss"] < previous_loss


# ---------------------------------------------------------------------------------------------
# run folder, checkpoints, logs


def _prepare_run_dir(out: Path, config: TrainConfig, resume: bool, main: bool) -> None:
    if resume:
        if not (out / "checkpoints").is_dir():
            raise ConfigError("nothing to resume: no checkpoints/ in the run folder", path=out)
        for name in ("best", "last"):  # killed between the two renames of _replace_dir
            old = out / f".{name}.old"
            if main and old.is_dir() and not (out / name).exists():
                os.replace(old, out / name)
        return
    check_output(out, folder=True)
    if (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(
            "run folder already holds a run: continue it with --resume, or choose another --out", path=out
        )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move complete folder ``tmp`` to ``final``, replacing what was there."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _full_trainable_state(model, accelerator, step_module) -> dict[str, torch.Tensor]:
    if accelerator.distributed_type.name == "FSDP":
        full = accelerator.get_state_dict(step_module)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {n.removeprefix("model."): t for n, t in full.items() if n.removeprefix("model.") in names}
    return trainable_state(model)


def _save_checkpoint(out, model, optimizer, scheduler, state, config, accelerator, step_module) -> None:
    weights = _full_trainable_state(model, accelerator, step_module)
    final = out / "checkpoints" / f"step-{state['step']}"
    tmp = out / "checkpoints" / f".tmp-step-{state['step']}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.to("cpu", torch.float32).contiguous() for k, v in weights.items()},
            tmp / "trainable.safetensors",
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        # LambdaLR stores lr_lambdas as [None] for plain functions: the state is JSON.
        scheduler_state = scheduler.state_dict()
        (tmp / "state.json").write_text(json.dumps({**state, "scheduler": scheduler_state}, indent=1))
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        kept = sorted(_checkpoints(out), key=lambda p: int(p.name.split("-")[1]))
        for stale in kept[: -config.keep_last]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()


def _checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return [p for p in folder.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()]


def _load_checkpoint(out: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    found = sorted(_checkpoints(out), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise ConfigError("nothing to resume: no complete checkpoint in checkpoints/", path=out)
    latest = found[-1]
    try:
        weights = load_file(latest / "trainable.safetensors")
        optimizer_state = torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu")
        state = json.loads((latest / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"cannot read checkpoint: {error}", path=latest) from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ConfigError(f"checkpoint does not fit the model (missing {missing[0]} …)", path=latest)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state.pop("scheduler"))
    rng_file = latest / f"rng-{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def _save_weights(final: Path, model, processor, config, accelerator, step_module, npz: bool = False) -> None:
    """Write an HF folder (LoRA folded in) that ``model.load`` reads, atomically."""
    from paligemma_xray.model import save_hf, save_lora, save_npz
    from paligemma_xray.model.hub import portable_ref

    full_fsdp = accelerator.distributed_type.name == "FSDP"
    state = accelerator.get_state_dict(step_module) if full_fsdp else None
    if accelerator.is_main_process:
        target = _export_model(model, config, state)
        tmp = final.with_name(f".tmp-{final.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        # No shard-writing bar: it would cut through the training bar.
        save_hf(target, processor, tmp, progress=False)
        if config.trainable == "lora":  # the adapter too, in PEFT's format, pointing at its base
            base = portable_ref(config.model)  # a Hub id stays one, with its revision
            save_lora(model, tmp / "adapter", base=base, revision=config.revision)
        if npz:
            save_npz(target, tmp / "model.npz", progress=False)
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def _export_model(model, config: TrainConfig, fsdp_state: dict | None) -> nn.Module:
    if config.trainable == "lora":
        fresh, _ = _load_model(config)
        merged = merged_state_dict(model, fresh.state_dict())
        fresh.load_state_dict(merged)
        return fresh
    if fsdp_state is not None:
        fresh, _ = _load_model(config)
        fresh.load_state_dict({k.removeprefix("model."): v for k, v in fsdp_state.items()}, strict=False)
        return fresh
    return unwrap(model)


class _Logs:
    """metrics.jsonl + TensorBoard, on the main process; resuming drops what a killed run
    logged after its last checkpoint."""

    def __init__(self, out: Path, start: int, config: TrainConfig, main: bool) -> None:
        self.main = main
        self.writer = None
        if not main:
            return
        self.path = out / "metrics.jsonl"
        if start and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start
            ]
            _atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        except ImportError:  # tensorboard is a dependency; a broken install only loses the plots
            logger.warning("tensorboard unavailable: no TensorBoard logs")

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")
        if self.writer is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, int | float) and value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["RunSummary", "evaluate", "lr_factor", "run"]
