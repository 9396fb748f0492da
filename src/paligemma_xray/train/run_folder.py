"""The run folder on disk: its checks, resumable checkpoints, and the ``best/`` / ``last/`` exports.

Layout::

    config.yaml            the resolved recipe (every field)
    metrics.jsonl  tb/     logs (train/logs.py)
    summary.json           what ``run`` returned
    checkpoints/step-N/    resumable state: trainable weights, optimiser, schedule, RNG per process
    best/  last/           HF folders that ``paligemma_xray.model.load`` reads
    last/model.npz         big_vision export (``export_npz``)

Every file and folder goes through :mod:`paligemma_xray.atomic`: written under a hidden
temporary name and renamed when complete, so a run killed at any moment leaves either the
old or the new version, never half of one. The main process writes; every process takes
part in the collectives (FSDP state dicts, RNG gathering) and waits for the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paligemma_xray.atomic import disk_errors, remove_stale_temporaries, staged_dir, write_json, write_text
from paligemma_xray.errors import ConfigError, check_output
from paligemma_xray.model.forms import BEST, LAST
from paligemma_xray.train import sharding
from paligemma_xray.train.logs import METRICS_LOG
from paligemma_xray.train.recipes import TrainConfig
from paligemma_xray.train.state import TrainState
from paligemma_xray.train.strategies import merged_state_dict, unwrap

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration


RUN_CONTENTS = ("config.yaml", METRICS_LOG, "summary.json", "progress.html", "tb", "checkpoints", BEST, LAST)
"""What a run writes into its folder (``--overwrite`` removes these, and only these)."""


def prepare_run_dir(out: Path, *, resume: bool, main: bool, overwrite: bool = False) -> None:
    """Refuse a folder that cannot hold this run, before any work.

    A fresh run needs a writable folder without a run in it (``overwrite``: the run in it
    is removed); a resumed one needs its ``config.yaml`` (a run killed before its first
    checkpoint starts again from step 0). Resuming removes the temporaries of writes a kill
    interrupted: the steps after the last checkpoint are replayed exactly, so ``best/`` and
    ``last/`` are written again if needed.
    """
    if resume:
        if overwrite:
            raise ConfigError("--resume continues a run; --overwrite would replace it: give one of them")
        if not (out / "config.yaml").is_file():
            raise ConfigError("nothing to resume: not a run folder (no config.yaml)", path=out)
        if main:
            remove_stale_temporaries(out)
            remove_stale_temporaries(out / "checkpoints")
        return
    check_output(out, folder=True)
    held = [name for name in RUN_CONTENTS if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            "run folder already holds a run: continue it with --resume, replace it with --overwrite,"
            " or choose another --out",
            path=out,
        )
    if held and main:
        with disk_errors(out):
            for name in held:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            remove_stale_temporaries(out)


def write_config(out: Path, config: TrainConfig) -> None:
    """``config.yaml``: every resolved field, so that ``from_run`` rebuilds the same recipe."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", config.to_yaml())


def write_summary(out: Path, summary: Any) -> None:
    """``summary.json``: the :class:`~paligemma_xray.train.loop.RunSummary` dataclass as JSON."""
    write_json(out / "summary.json", asdict(summary))


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of the run in ``out``, oldest first."""
    folder = out / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def interrupted_message(run_dir: Path) -> str:
    """What Ctrl-C leaves: the last checkpoint saved and the command that continues from it."""
    saved = checkpoints(run_dir) if run_dir.is_dir() else []
    if not saved:
        if (run_dir / "config.yaml").is_file():
            return (
                f"interrupted before the first checkpoint of {run_dir}. "
                f"Start it again with: paligemma-xray train --resume {run_dir}"
            )
        return f"interrupted before {run_dir} was created: nothing to resume"
    step = saved[-1].name.split("-")[1]
    return (
        f"interrupted; the last checkpoint saved is step {step} ({saved[-1]}). "
        f"Continue with: paligemma-xray train --resume {run_dir}"
    )


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(
    out: Path,
    state: TrainState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    step_module: nn.Module,
    keep_last: int,
) -> None:
    """Write ``checkpoints/step-N/`` (N = ``state.step``) and keep only the newest ``keep_last``.

    The trainable weights (float32), the optimiser and schedule state, ``state`` and each
    process's RNG state (gathered to the main process) — what an exact resume needs; the
    frozen weights come from ``config.model``.
    """
    from accelerate.utils import gather_object

    weights = sharding.trainable_state(model)  # gathered whole under FSDP
    optimizer_state = sharding.optimizer_state(model, optimizer)
    rng = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    if accelerator.is_main_process:
        with staged_dir(out / "checkpoints" / f"step-{state.step}") as tmp:
            save_file(
                {k: v.to("cpu", torch.float32).contiguous() for k, v in weights.items()},
                tmp / "trainable.safetensors",
            )
            kill_point("checkpoint-writing", state.step)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            # LambdaLR stores lr_lambdas as [None] for plain functions: the state is JSON.
            record = {**state.to_json(), "scheduler": scheduler.state_dict()}
            (tmp / "state.json").write_text(json.dumps(record, indent=1))
            for rank, rank_rng in enumerate(rng):
                torch.save(rank_rng, tmp / f"rng-{rank}.pt")
        kill_point("checkpoint-written", state.step)
        for stale in checkpoints(out)[:-keep_last]:
            # Renamed aside first: a kill while removing it leaves a temporary (removed on
            # resume), never a half-deleted folder under a checkpoint's name.
            aside = stale.with_name(f".{stale.name}.tmp-prune-{os.getpid()}")
            os.replace(stale, aside)
            kill_point("pruning", state.step)
            shutil.rmtree(aside)
    accelerator.wait_for_everyone()


KILL_AT_VARIABLE = "PALIGEMMA_XRAY_KILL_AT"
"""``POINT:STEP`` (e.g. ``pruning:3``): SIGKILL the process at that point of checkpoint
STEP. For ``benchmarks/kill_storm.py`` and the resume tests only: the windows a kill at a
random moment rarely hits (mid-checkpoint, mid-pruning), hit on purpose."""


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process here when :data:`KILL_AT_VARIABLE` names ``point`` and ``step``."""
    if os.environ.get(KILL_AT_VARIABLE) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(
    out: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> TrainState:
    """Restore the newest checkpoint into ``model``, ``optimizer``, ``scheduler`` and this process's RNG."""
    found = checkpoints(out)
    if not found:
        raise ConfigError("nothing to resume: no complete checkpoint in checkpoints/", path=out)
    latest = found[-1]
    try:
        weights = load_file(latest / "trainable.safetensors")
        optimizer_state = torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu")
        record = json.loads((latest / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"cannot read checkpoint: {error}", path=latest) from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ConfigError(f"checkpoint does not fit the model (missing {missing[0]} …)", path=latest)
    sharding.load(model, weights, optimizer, optimizer_state)  # scattered to the shards under FSDP
    scheduler.load_state_dict(record["scheduler"])
    rng_file = latest / f"rng-{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainState.from_json(record)


def load_base(config: TrainConfig) -> tuple[Any, Any]:
    """The model and processor the recipe starts from (``config.model``)."""
    from paligemma_xray.model import load

    return load(config.model, tokenizer=config.tokenizer, progress=config.progress, revision=config.revision)


def save_weights(
    final: Path,
    *,
    model: nn.Module,
    processor: Any,
    config: TrainConfig,
    accelerator: Any,
    step_module: nn.Module,
    npz: bool = False,
    full: bool = True,
) -> None:
    """Write ``best/`` or ``last/``, folders that ``paligemma_xray.model.load`` reads.

    ``full`` (``last/``, once, at the end): one complete HF folder that plain transformers
    loads; frozen weights in the base checkpoint's dtype, trained ones in float32 (so a run
    of a float16 base holds about 1× the base, not a float32 2×); with LoRA folded in, and
    the adapter too (``adapter/``); with ``npz``, the big_vision export ``model.npz`` in the
    base's dtype. Not full (``best/``, at every improvement): only what training changed —
    the trainable weights (``trained.safetensors``, float32, and ``trained.json`` naming the
    base and tokenizer) or the LoRA adapter — never another copy of the frozen weights.
    """
    from paligemma_xray.atomic import write_json
    from paligemma_xray.model import save_hf, save_lora, save_npz
    from paligemma_xray.model.forms import RUN_ADAPTER, TRAINED_INFO, TRAINED_WEIGHTS
    from paligemma_xray.model.hub import portable_ref
    from paligemma_xray.model.loading import DTYPES, stored_dtype

    lora = config.trainable == "lora"
    base = portable_ref(config.model)  # a Hub id stays one, with its revision
    info = {
        "base": base,
        "revision": config.revision,
        "tokenizer": str(Path(config.tokenizer).resolve()) if config.tokenizer else None,
        "trainable": config.trainable,
    }
    sharded = sharding.is_sharded(step_module)
    # Under FSDP the live weights are shards: exports read a gathered copy of the trained ones.
    weights = sharding.trainable_state(model) if sharded or not (full or lora) else None
    adapter_state = weights if lora else None
    if not full:
        if accelerator.is_main_process:
            with staged_dir(final) as tmp:
                if lora:
                    save_lora(model, tmp, base=base, revision=config.revision, state_dict=adapter_state)
                else:
                    assert weights is not None
                    trained = {k: v.to("cpu", torch.float32).contiguous() for k, v in weights.items()}
                    save_file(trained, tmp / TRAINED_WEIGHTS)
                write_json(tmp / TRAINED_INFO, info)
        accelerator.wait_for_everyone()
        return
    if accelerator.is_main_process:
        base_dtype = stored_dtype(config.model, config.revision)
        with staged_dir(final) as tmp:
            if lora:  # first: the export below may fold the adapter into the model
                save_lora(
                    model, tmp / RUN_ADAPTER, base=base, revision=config.revision, state_dict=adapter_state
                )
            target = _export_model(model, config, weights, DTYPES[base_dtype])
            # No shard-writing bar: it would cut through the training bar.
            save_hf(target, processor, tmp, progress=False, staged=False)  # staged here, whole
            if npz:
                save_npz(target, tmp / "model.npz", dtype=base_dtype, progress=False)
    accelerator.wait_for_everyone()


def _with_trained(
    fresh: PaliGemmaForConditionalGeneration, trained: dict[str, torch.Tensor]
) -> PaliGemmaForConditionalGeneration:
    """``fresh`` (the base, in its stored dtype) with ``trained`` put in as float32 parameters."""
    params = dict(fresh.named_parameters())
    for name, tensor in trained.items():
        params[name].data = tensor.detach().to("cpu", torch.float32).clone()
    return fresh


def _export_model(
    model: nn.Module, config: TrainConfig, fsdp_state: dict | None, base_dtype: torch.dtype
) -> PaliGemmaForConditionalGeneration:
    """The model ``last/`` holds: frozen weights as the base stores them, trained ones float32.

    ``fsdp_state``: the trained weights gathered whole (FSDP: the live ones are shards), by name.

    Called once, after the last step: the training model itself is cast (and a LoRA adapter
    folded into it) where that is exact — frozen weights held in float32 or in the base's
    dtype, no 4-bit base — so no second copy of the model is made (a 3B LoRA run on a CPU
    would otherwise hold its float32 training model and a fresh base at once).
    """
    core = unwrap(model)
    frozen = [p for p in core.parameters() if not p.requires_grad and p.dtype.is_floating_point]
    exact = all(p.dtype in (torch.float32, base_dtype) for p in frozen)
    if config.trainable == "lora" and exact and config.quantize == "none" and fsdp_state is None:
        from peft.tuners.lora import LoraLayer

        adapted = {f"{n}.weight" for n, m in core.named_modules() if isinstance(m, LoraLayer)}
        peft_model: Any = model
        merged = peft_model.merge_and_unload()
        with torch.no_grad():
            for name, param in merged.named_parameters():
                if name in adapted:
                    param.data = param.data.to(torch.float32)
                elif param.dtype.is_floating_point:
                    param.data = param.data.to(base_dtype)
        return merged
    if config.trainable == "lora":
        from peft.tuners.lora import LoraLayer

        fresh, _ = load_base(config)
        core = unwrap(model)
        adapted = {f"{n}.weight" for n, m in core.named_modules() if isinstance(m, LoraLayer)}
        fresh_state = fresh.state_dict()
        base_state = {k: fresh_state[k] for k in adapted}
        return _with_trained(fresh, merged_state_dict(model, base_state, trained=fsdp_state))
    if fsdp_state is not None:
        fresh, _ = load_base(config)
        return _with_trained(fresh, fsdp_state)
    if not exact:
        # e.g. bfloat16 frozen weights of a float16 base: casting back would not be exact.
        fresh, _ = load_base(config)
        return _with_trained(fresh, {n: p for n, p in core.named_parameters() if p.requires_grad})
    with torch.no_grad():
        for param in frozen:
            param.data = param.data.to(base_dtype)
    return core
