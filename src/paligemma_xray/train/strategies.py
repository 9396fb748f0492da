"""Which weights train, in which dtype, on which device.

Strategies (``TrainConfig.trainable``):

- ``attention`` — q, k, v, o projections of every language-model layer (big_vision's recipe);
- ``language-model`` — the whole language model (embeddings = tied lm_head included); the
  vision tower and projector stay frozen;
- ``all`` — every weight;
- ``lora`` — LoRA adapters (peft) on ``lora_targets`` of the language model, optionally over
  a 4-bit (NF4, bitsandbytes) base: QLoRA, on a CUDA GPU or on the CPU (bitsandbytes ≥ 0.50
  ships CPU kernels for 4-bit; its backward dequantizes the weight and multiplies in torch).

Trainable weights are kept in float32 (SGD steps of 0.01 × small gradients vanish in bf16);
frozen ones in bf16 when computing in bf16 (half the memory), else float32. Only parameters
are cast, never buffers: a bf16 rotary ``inv_freq`` would shift every position.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from paligemma_xray.errors import ConfigError
from paligemma_xray.train.recipes import TrainConfig

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration

_ATTENTION = re.compile(r"(^|\.)language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.(weight|bias)$")
_LANGUAGE_MODEL = re.compile(r"(^|\.)language_model\.")


def unwrap(model: nn.Module) -> PaliGemmaForConditionalGeneration:
    """The ``PaliGemmaForConditionalGeneration`` inside a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        return cast("PaliGemmaForConditionalGeneration", get_base_model())
    return cast("PaliGemmaForConditionalGeneration", model)


def trainable_names(model: nn.Module, trainable: str) -> list[str]:
    """Names (as in ``model.named_parameters()``) a non-LoRA strategy trains."""
    names = [name for name, _ in model.named_parameters()]
    if trainable == "all":
        return names
    if trainable == "attention":
        chosen = [n for n in names if _ATTENTION.search(n)]
    elif trainable == "language-model":
        chosen = [n for n in names if _LANGUAGE_MODEL.search(n)]
    else:
        raise ValueError(f"no parameter list for strategy {trainable!r}")
    if not chosen:
        raise ConfigError(
            f"recipe does not fit the model: strategy {trainable!r} matches no parameter "
            "(is this a PaliGemma checkpoint?)"
        )
    return chosen


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device, bf16: bool) -> nn.Module:
    """Freeze, wrap (LoRA), quantize (QLoRA), cast and move ``model`` for training.

    Returns the model to train (a peft wrapper for ``lora``). ``bf16``: frozen weights in
    bfloat16 (GPU compute in bf16); else everything float32.
    """
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    if config.quantize == "4bit":
        _check_qlora()
    for param in model.parameters():
        param.requires_grad_(False)

    if config.trainable == "lora":
        if config.quantize == "4bit":
            _cast_parameters(model, frozen_dtype)
            _quantize_language_model(model, frozen_dtype)
        model = _add_lora(model, config)
    else:
        wanted = set(trainable_names(model, config.trainable))
        for name, param in model.named_parameters():
            param.requires_grad_(name in wanted)

    for param in model.parameters():
        if param.dtype.is_floating_point:
            param.data = param.data.to(torch.float32 if param.requires_grad else frozen_dtype)
    model.to(device)
    if config.activation_checkpointing:
        # Non-reentrant checkpointing works when a layer's input needs no gradient
        # (frozen embeddings), which the reentrant variant silently mishandles.
        # transformers renamed it (the old name warns on every `--recipe full`); older: the old name.
        core = unwrap(model)
        if hasattr(core, "activation_checkpointing_enable"):
            core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def vision_frozen(model: nn.Module) -> bool:
    """True when neither the vision tower nor the projector has a trainable weight."""
    core = unwrap(model).model
    modules = (core.vision_tower, core.multi_modal_projector)
    return not any(p.requires_grad for m in modules for p in m.parameters())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a resumable checkpoint stores)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a 4-bit weight counts its packed elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    for param in model.parameters():
        if param.dtype.is_floating_point:
            param.data = param.data.to(dtype)


def _add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = "|".join(re.escape(t) for t in config.lora_targets)
    # A regex so that the vision tower's q/k/v projections (same names) get no adapter.
    pattern = rf".*language_model\.layers\.\d+\..*\.({targets})"
    names = [n for n, _ in model.named_modules()]
    if not any(re.fullmatch(pattern, n) for n in names):
        raise ConfigError(
            f"recipe does not fit the model: lora_targets {config.lora_targets} match no language-model layer"
        )
    lora = LoraConfig(
        r=config.lora_rank,
        # peft annotates lora_alpha as int; it only divides by it (scaling = alpha / r), floats work.
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        target_modules=pattern,
        bias="none",
    )
    return get_peft_model(model, lora)


def _check_qlora() -> None:
    # On import, bitsandbytes' CPU backend warns that an optional fused inference kernel
    # (``kernels`` package) is missing; training never uses that kernel (see below).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("the qlora recipe needs bitsandbytes: pip install 'paligemma-xray[gpu]'") from None


def _quantize_language_model(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace the language model's linears by NF4 ``Linear4bit`` (quantized by ``.to(device)``).

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight for its fused
    inference kernel the first time it runs in eval mode without gradients (our validation),
    and keeps it so: later training forwards then go through that kernel, which has no
    backward — the gradient to the layer's input is silently dropped (torch only warns), and
    every LoRA adapter below it stops learning the right thing. Training modules never take
    that path here (``support_avx512bf16_for_cpu = False``).
    """
    import bitsandbytes as bnb

    language_model = unwrap(model).model.language_model
    for module in list(language_model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
            quantized.support_avx512bf16_for_cpu = False  # see above: keeps the backward
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, quantized)


def merged_state_dict(
    model: nn.Module,
    base_state: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Weights of a LoRA-trained model with the adapters folded in, on the CPU in float32.

    ``base_state``: the base checkpoint's own weights (HF names), so that a 4-bit base is
    merged from its original, unquantized values; the live model is left untouched (merging
    in place and back is not exact, and would break an exact resume). ``trained``: the
    adapters' weights by parameter name, whole, when the live ones are FSDP shards
    (``sharding.trainable_state``); else they are read from the model.
    """
    from peft.tuners.lora import LoraLayer

    merged = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base_state.items()}
    names = {id(m): n for n, m in model.named_modules()}
    core = unwrap(model)
    for name, module in core.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = f"{name}.weight"
        if key not in merged:
            raise KeyError(f"adapted layer {name} has no base weight {key}")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if trained is None:
                # Every concrete LoraLayer (Linear, bitsandbytes' 8/4-bit) defines it; the base
                # class that peft's stubs describe does not declare it.
                delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]
            else:  # peft's delta of a Linear: B @ A × scaling
                prefix = names[id(module)]
                a = trained[f"{prefix}.lora_A.{adapter}.weight"].to("cpu", torch.float32)
                b = trained[f"{prefix}.lora_B.{adapter}.weight"].to("cpu", torch.float32)
                delta = (b @ a) * module.scaling[adapter]
            merged[key] += delta.detach().to("cpu", torch.float32)
    return merged
