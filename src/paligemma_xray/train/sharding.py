"""``distributed: fsdp``: torch's per-parameter sharding (FSDP2, ``fully_shard``).

Why FSDP2 and not FSDP1 (accelerate's FSDP plugin): FSDP1 flattens each wrapped module's
weights into one flat parameter, which must have one dtype. Training in bf16 keeps frozen
weights in bf16 and trained ones in float32 (strategies.py), often in the same decoder layer
(the attention recipe, LoRA), and FSDP1 fails with "Must flatten tensors with uniform dtype
but got torch.bfloat16 and torch.float32"; accelerate's plugin also refuses the CPU. FSDP2
shards each parameter on its own (a ``DTensor``): each keeps its dtype (the mixed-precision
policy sets no ``param_dtype``: autocast computes in bf16, exactly as on one process), and
gradients are reduced in float32. Decoder and encoder layers are shard groups, the rest of
the model is the root's group. Runs on NCCL (GPUs) and gloo (CPU, how the tests run it).

Code that calls the inner model directly, outside the root's forward (validation, the
image-feature cache, exports), runs inside :func:`whole`; checkpoints gather and scatter
the trainable weights and the optimiser state through :func:`trainable_state`,
:func:`optimizer_state` and :func:`load`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: Module classes that become FSDP groups of their own (transformers' names).
LAYERS = ("GemmaDecoderLayer", "Gemma2DecoderLayer", "SiglipEncoderLayer")


def shard(module: nn.Module) -> nn.Module:
    """Shard ``module`` (the loop's step module) over the default process group, in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for sub in module.modules():
        if type(sub).__name__ in LAYERS:
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def _fsdp_modules(module: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` (or a module inside it) is sharded by :func:`shard`."""
    return bool(_fsdp_modules(module))


@contextlib.contextmanager
def whole(module: nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` gathered whole on every process, until the block ends.

    Inside, the model can be called directly, any number of times per process (decoding
    lengths differ between processes), with no collective. A collective itself: every
    process enters it. Nothing happens for a module that is not sharded. Read weights
    through ``named_parameters()`` inside, never ``state_dict()`` (FSDP2 reshards for it).
    """
    groups = _fsdp_modules(module)
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
        for m in groups:
            # the root keeps its weights after forward (FSDP2's own default for the root)
            m.set_reshard_after_forward(m is not module, recurse=False)


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reducing them over processes (all but the last micro-batch)."""
    groups = _fsdp_modules(module)
    for m in groups:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in groups:
            m.set_requires_gradient_sync(True, recurse=False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole (gathered: every process calls it)."""
    return {name: _full(p.detach()) for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state, whole and keyed by parameter name when sharded (every process calls it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    optimizer_state: dict[str, Any],
) -> None:
    """Put whole ``weights`` (by name) and a whole optimiser state (as :func:`optimizer_state`
    returns it) into a model and optimiser, sharded or not; every process calls it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            param = params[name]
            if isinstance(param, DTensor):  # each process holds the whole file: no communication
                tensor = distribute_tensor(
                    tensor.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
                )
            param.copy_(tensor)
    if not is_sharded(model):
        optimizer.load_state_dict(optimizer_state)
        return
    if not optimizer_state.get("state"):
        # No per-weight state (plain SGD): torch's loader refuses it; the groups' settings
        # (the learning rate of the step the schedule is at) are all there is to restore.
        for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
