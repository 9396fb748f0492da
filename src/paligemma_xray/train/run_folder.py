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
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paligemma_xray.atomic import remove_stale_temporaries, staged_dir, write_json, write_text
from paligemma_xray.errors import ConfigError, check_output
from paligemma_xray.train.recipes import TrainConfig
from paligemma_xray.train.state import TrainState
from paligemma_xray.train.strategies import merged_state_dict, trainable_state, unwrap

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration


def prepare_run_dir(out: Path, *, resume: bool, main: bool) -> None:
    """Refuse a folder that cannot hold this run, before any work; creates nothing.

    A fresh run needs a writable folder without a run in it; a resumed one needs checkpoints.
    Resuming removes the temporaries of writes a kill interrupted: the steps after the last
    checkpoint are replayed exactly, so ``best/`` and ``last/`` are written again if needed.
    """
    if resume:
        if not (out / "checkpoints").is_dir():
            raise ConfigError("nothing to resume: no checkpoints/ in the run folder", path=out)
        if main:
            remove_stale_temporaries(out)
            remove_stale_temporaries(out / "checkpoints")
        return
    check_output(out, folder=True)
    if (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(
            "run folder already holds a run: continue it with --resume, or choose another --out", path=out
        )


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


def _full_trainable_state(
    model: nn.Module, accelerator: Any, step_module: nn.Module
) -> dict[str, torch.Tensor]:
    if accelerator.distributed_type.name == "FSDP":
        full = accelerator.get_state_dict(step_module)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {n.removeprefix("model."): t for n, t in full.items() if n.removeprefix("model.") in names}
    return trainable_state(model)


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

    weights = _full_trainable_state(model, accelerator, step_module)
    rng = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    if accelerator.is_main_process:
        with staged_dir(out / "checkpoints" / f"step-{state.step}") as tmp:
            save_file(
                {k: v.to("cpu", torch.float32).contiguous() for k, v in weights.items()},
                tmp / "trainable.safetensors",
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            # LambdaLR stores lr_lambdas as [None] for plain functions: the state is JSON.
            record = {**state.to_json(), "scheduler": scheduler.state_dict()}
            (tmp / "state.json").write_text(json.dumps(record, indent=1))
            for rank, rank_rng in enumerate(rng):
                torch.save(rank_rng, tmp / f"rng-{rank}.pt")
        for stale in checkpoints(out)[:-keep_last]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()


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
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(optimizer_state)
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
) -> None:
    """Write ``best/`` or ``last/``: an HF folder (LoRA folded in) that ``model.load`` reads.

    With LoRA, the adapter too (``adapter/``, PEFT's format, pointing at its base); with
    ``npz``, the big_vision export ``model.npz``.
    """
    from paligemma_xray.model import save_hf, save_lora, save_npz
    from paligemma_xray.model.hub import portable_ref

    full_fsdp = accelerator.distributed_type.name == "FSDP"
    fsdp_state = accelerator.get_state_dict(step_module) if full_fsdp else None
    if accelerator.is_main_process:
        target = _export_model(model, config, fsdp_state)
        with staged_dir(final) as tmp:
            # No shard-writing bar: it would cut through the training bar.
            save_hf(target, processor, tmp, progress=False)
            if config.trainable == "lora":
                base = portable_ref(config.model)  # a Hub id stays one, with its revision
                save_lora(model, tmp / "adapter", base=base, revision=config.revision)
            if npz:
                save_npz(target, tmp / "model.npz", progress=False)
    accelerator.wait_for_everyone()


def _export_model(
    model: nn.Module, config: TrainConfig, fsdp_state: dict | None
) -> PaliGemmaForConditionalGeneration:
    if config.trainable == "lora":
        fresh, _ = load_base(config)
        fresh.load_state_dict(merged_state_dict(model, fresh.state_dict()))
        return fresh
    if fsdp_state is not None:
        fresh, _ = load_base(config)
        fresh.load_state_dict({k.removeprefix("model."): v for k, v in fsdp_state.items()}, strict=False)
        return fresh
    return unwrap(model)
