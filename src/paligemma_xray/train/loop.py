"""The training loop: ``run(config) -> RunSummary``.

One process or many (``torchrun`` / ``accelerate launch`` set RANK/WORLD_SIZE; accelerate
wraps the model in DDP, or :mod:`~paligemma_xray.train.sharding` shards it with FSDP2 for
``distributed: fsdp``). The whole optimiser step is in
:func:`run`, on one screen. Around it: the run folder and checkpoints
(:mod:`~paligemma_xray.train.run_folder`), logs (:mod:`~paligemma_xray.train.logs`), the
loop's state (:mod:`~paligemma_xray.train.state`), validation
(:mod:`~paligemma_xray.train.validation`), and the small helpers below.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paligemma_xray.data.bad_records import BadRecords
from paligemma_xray.errors import ConfigError, DataError
from paligemma_xray.model.forms import BEST, LAST
from paligemma_xray.model.processing import build_batch
from paligemma_xray.train import sharding
from paligemma_xray.train.batches import Augment, Examples, FeatureCache, step_positions
from paligemma_xray.train.logs import MetricsLog, progress_bar
from paligemma_xray.train.loss import image_features, loss_denominator, suffix_loss
from paligemma_xray.train.recipes import TrainConfig
from paligemma_xray.train.run_folder import (
    checkpoints,
    load_base,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    save_weights,
    write_config,
    write_summary,
)
from paligemma_xray.train.state import TrainState, runtime
from paligemma_xray.train.strategies import count_parameters, prepare_model, unwrap, vision_frozen
from paligemma_xray.train.validation import validate

logger = logging.getLogger(__name__)

#: ``on_validation(run_dir, step, rows)``: see :func:`run`.
OnValidation = Callable[[Path, int, list[dict]], None]

# Image-feature caches larger than this stay in host memory.
_CACHE_ON_DEVICE_BYTES = 4 * 2**30


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
    stopped_early: bool = False
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

    def forward(self, batch=None, features=None, denominator=None, pixels=None):
        if pixels is not None:  # the image-feature cache under FSDP (through the root: see sharding)
            return image_features(self.model, pixels)
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


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM; ``step``: the checkpoint saved (``None``: none)."""

    def __init__(self, signal_name: str, step: int | None) -> None:
        super().__init__(signal_name)
        self.signal_name, self.step = signal_name, step


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, systemd, Slurm, Kubernetes) alike, while training.

    Inside the step loop (``armed``) the first signal asks the loop to finish its step, save
    a checkpoint and stop (:class:`Interrupted`); a second one, or one before the loop
    starts (loading, caching), stops at once like Ctrl-C (the last checkpoint is the state).
    Installed only in the main thread of the main interpreter (signal handlers live there).
    """

    def __init__(self) -> None:
        self.armed = False
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.armed and self.requested is None:
            self.requested = name
            logger.warning("%s: saving a checkpoint after this step (send it again to stop at once)", name)
            return
        raise Interrupted(name, None)


def run(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_validation: OnValidation | None = None,
) -> RunSummary:
    """Train as ``config`` says; ``resume``: continue the run in ``config.out``.

    The continuation is bit-exact (the same weights, optimiser state and ``metrics.jsonl``
    as an uninterrupted run) when it runs under the same :func:`~paligemma_xray.train.state.runtime`
    values (torch version, CPU threads, device, processes); under others it says so in one
    line and continues. A run killed before its first checkpoint starts again from step 0.
    ``overwrite``: replace the run already in ``config.out`` (else refused).

    SIGINT and SIGTERM: the step in progress finishes, a checkpoint is saved and
    :class:`Interrupted` (a ``KeyboardInterrupt``) is raised; a second signal stops at once.

    ``on_validation(run_dir, step, rows)``: called on the main process after every
    validation with its decoded rows (``evaluate_records``' rows), after ``metrics.jsonl``
    has the evaluation; the CLI passes the report layer's progress page writer. With
    ``early_stop`` N, training stops after N evaluations in a row without a new best
    (``best/`` is kept; ``last/`` is the weights at the stop).
    """
    config.validate()
    accelerator = _accelerator(config)
    world = accelerator.num_processes
    _use_bf16(config, accelerator.device)  # precision: bf16 without a GPU is refused first
    out = Path(config.out)
    _check_world(config, world)
    records = _records(config)
    prepare_run_dir(out, resume=resume, overwrite=overwrite, main=accelerator.is_main_process)
    with _StopSignals() as signals:
        return _run(
            config, out, accelerator, records, resume=resume, on_validation=on_validation, signals=signals
        )


def _run(
    config: TrainConfig,
    out: Path,
    accelerator: Any,
    records: tuple[list, list],
    *,
    resume: bool,
    on_validation: OnValidation | None,
    signals: _StopSignals,
) -> RunSummary:
    """:func:`run` once the run folder is checked, under the stop-signal handlers."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    bf16 = _use_bf16(config, device)
    train_records, valid_records = records

    torch.manual_seed(config.seed)  # same LoRA initialisation on every process and on resume
    base, processor = load_base(config)
    model = prepare_model(base, config, device, bf16)
    if main and not resume:  # only now: a model or recipe that does not load leaves no run folder
        write_config(out, config)
    accelerator.wait_for_everyone()
    n_trainable, n_total = count_parameters(model)
    first_location_id = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    step_module: nn.Module = _StepModule(model, config, first_location_id)
    if config.distributed == "fsdp" and world > 1:
        step_module = sharding.shard(step_module)
    else:
        step_module = accelerator.prepare_model(step_module)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = _optimizer(config, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(config, i + 1))
    # What save_weights needs to export best/ and last/.
    exports = dict(
        model=model, processor=processor, config=config, accelerator=accelerator, step_module=step_module
    )

    bad_records = BadRecords(config.max_bad_records)
    examples = Examples(train_records, _augment(config), config.seed, _load_image, bad_records=bad_records)
    state = TrainState()
    current = runtime(device, world)
    if resume and checkpoints(out):
        state = load_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        differs = state.resumed_under(current)
        if differs and main:
            logger.warning("%s", differs)
    else:
        if resume and main:
            logger.warning("%s: no checkpoint saved yet; training again from step 0", out)
        state.runtime = current
    cache = _feature_cache(
        config, model, step_module, examples, processor, device=device, bf16=bf16, main=main
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    logs = MetricsLog(out, state.step, main=main, resume=resume)
    steps, start = config.steps, state.step
    bar = progress_bar(config, start, main=main)
    per_rank = config.batch_size // world
    t_start = time.perf_counter()
    loss_value: float | None = None
    last_eval: dict[str, Any] = {}

    done = start
    signals.armed = True
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
                contextlib.nullcontext() if sync else _no_sync(accelerator, step_module),
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
            # refresh=False: the bar prints at its own interval (every 30 s off a terminal), not every step
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
        if done % config.log_every == 0 or done == steps:
            logs.write({"kind": "train", "step": done, "loss": loss_value, "lr": lr, "examples_per_s": rate})
        if valid_records and (done % config.eval_interval == 0 or done == steps):
            with sharding.whole(step_module):  # validation calls the model directly
                validated = validate(
                    model,
                    processor,
                    valid_records,
                    config,
                    device=device,
                    bf16=bf16,
                    accelerator=accelerator,
                    return_rows=True,
                )
            assert isinstance(validated, tuple)  # return_rows=True: (metrics, rows)
            last_eval, rows = validated
            logs.write({"kind": "eval", "step": done, **last_eval})
            if state.improves(last_eval):
                state.record_best(last_eval, done)
                state.stale_evals = 0
                save_weights(out / BEST, full=False, **exports)
            else:
                state.stale_evals += 1
            if main and on_validation is not None:
                on_validation(out, done, rows)
        stop = bool(config.early_stop) and state.stale_evals >= config.early_stop and done < steps
        interrupt = _stop_requested(accelerator, signals)
        if done % config.checkpoint_interval == 0 or done == steps or stop or interrupt:
            state.step = done
            save_checkpoint(
                out,
                state,
                optimizer=optimizer,
                scheduler=scheduler,
                keep_last=config.keep_last,
                model=model,
                accelerator=accelerator,
                step_module=step_module,
            )
        if interrupt and done < steps:
            signals.armed = False
            logs.close()
            if bar is not None:
                bar.close()
            raise Interrupted(signals.requested or "signal", done)
        if stop:
            logs.write(
                {"kind": "early_stop", "step": done, "evaluations_without_improvement": state.stale_evals}
            )
            logger.info("early stop at step %d: %d evaluations without a new best", done, state.stale_evals)
            break

    signals.armed = False
    if bar is not None:
        bar.close()
    if start < done or not (out / LAST).exists():
        save_weights(out / LAST, npz=config.export_npz, **exports)
    elapsed = time.perf_counter() - t_start
    summary = RunSummary(
        run_dir=str(out),
        steps=done,
        examples_per_s=(done - start) * config.batch_size / elapsed if done > start else 0.0,
        final_loss=loss_value,
        best_metric=state.best_metric,
        best_value=state.best_value,
        best_step=state.best_step,
        last_eval=last_eval,
        stopped_early=done < steps,
        trainable_parameters=n_trainable,
        total_parameters=n_total,
        processes=world,
    )
    if main:
        write_summary(out, summary)
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
        betas=(config.adam_betas[0], config.adam_betas[1]),
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
    # autocast is ours (see run); FSDP too (sharding.py): accelerate sets up the processes.
    return Accelerator(cpu=cpu, mixed_precision="no")


def _check_world(config: TrainConfig, world: int) -> None:
    """What a recipe needs of the number of processes, refused before any work."""
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(
            f"batch_size {config.batch_size} must divide by processes × grad_accum"
            f" = {world} × {config.grad_accum}"
        )
    if config.distributed == "fsdp" and world > 1 and config.quantize == "4bit":
        # FSDP2 turns each weight into a DTensor; bitsandbytes' packed 4-bit weights lose
        # their quantization state on the way ("quant_state is required").
        raise ConfigError("distributed: fsdp cannot shard 4-bit weights (qlora); use distributed: ddp")


def _no_sync(accelerator, step_module: nn.Module):
    """No gradient reduction for this micro-batch (DDP's no_sync, FSDP2's requires_gradient_sync)."""
    if sharding.is_sharded(step_module):
        return sharding.no_sync(step_module)
    return accelerator.no_sync(step_module)


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast with frozen weights in bf16: ``auto`` on a GPU, ``bf16`` anywhere.

    On a CPU with native bf16 matmul a small model's step takes 0.45× float32's time
    (``benchmarks/frozen_dtype.py``, idle machine), but the 3B ``lora`` run of
    ``benchmarks/real_size.py`` in bf16 was killed for memory at 24 GB (float32: 18 GB), so
    ``auto`` stays float32 on a CPU until that is understood; ``precision: bf16`` asks for it.
    """
    if config.precision == "bf16":
        return True
    return config.precision == "auto" and device.type == "cuda"


def _stop_requested(accelerator, signals: _StopSignals) -> bool:
    """Whether a stop signal reached any process (all of them must save the same step)."""
    return _all_sum(accelerator, float(signals.requested is not None)) > 0


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


# ---------------------------------------------------------------------------------------------
# data and model


def _load_image(path):
    from paligemma_xray.data import load_image

    return load_image(path)


def _records(config: TrainConfig) -> tuple[list, list]:
    from paligemma_xray.data import open_dataset

    dataset = open_dataset(config.data, allow_outside_images=config.allow_outside_images)
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


def _augment(config: TrainConfig) -> Augment:
    return Augment(shuffle_objects=config.shuffle_objects, hflip=config.hflip, jitter=config.jitter)


def _features_fn(model: nn.Module):
    return lambda pixels: image_features(model, pixels)


def _feature_cache(
    config: TrainConfig,
    model: nn.Module,
    step_module: nn.Module,
    examples: Examples,
    processor: Any,
    *,
    device: torch.device,
    bf16: bool,
    main: bool,
) -> FeatureCache | None:
    """Image features of every training record the run will use, computed up front in a
    fixed order, so that a fresh run and a resumed one use bit-identical features."""
    if not (config.cache_image_features and vision_frozen(model) and not examples.augment.changes_pixels):
        return None
    used = sorted({examples.record_index(k) for k in range(config.steps * config.batch_size)})
    model_config: Any = unwrap(model).config  # transformers types its sub-configs loosely
    vision = model_config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    size = len(used) * tokens * model_config.text_config.hidden_size * (2 if bf16 else 4)
    # Large sets (high resolution, many images) stay in host memory, moved per batch.
    cache = FeatureCache(device if size <= _CACHE_ON_DEVICE_BYTES else torch.device("cpu"))
    if main:
        logger.info("caching image features of %d images (%.1f MB)", len(used), size / 2**20)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # Sharded: through the root module, whose forward gathers the weights (the same number of
    # batches on every process); else the model itself.
    compute = (lambda px: step_module(pixels=px)) if sharding.is_sharded(step_module) else _features_fn(model)
    for s in range(0, len(used), config.eval_batch_size):
        keys = used[s : s + config.eval_batch_size]
        records = [examples.records[i] for i in keys]
        pixels = build_batch(
            processor,
            [examples.image(i)[1] for i in keys],  # an unreadable image: the one standing in
            [r.prefix for r in records],
            [r.suffix for r in records],
            max_length=config.max_length,
        )["pixel_values"]
        with autocast:
            cache.get(compute, keys, pixels.to(device))
    return cache


__all__ = ["Interrupted", "RunSummary", "lr_factor", "run"]
