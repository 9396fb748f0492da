"""Which dtype the weights take for inference on a device: the one owner of that choice.

On a CPU with native bfloat16 matrix units (x86 AMX or AVX-512 BF16, ARM's BF16/SVE-BF16
extensions) a bfloat16 matmul runs several times faster than float16 or float32 (measured
on this project's 2-core AMD EPYC with AVX-512 BF16 and no AMX: 2048→16384 on 256 tokens,
the 3B model's prefill, bf16 780–815 GFLOP/s against 49 for float16 and 150 for float32),
so ``predict``, ``evaluate``, ``serve`` and ``pacs`` load the weights in bfloat16 there.
The decisions stay float32 (:mod:`paligemma_xray.model.head`: the location and EOS rows of
the output head kept from the checkpoint, the top logits recomputed in float32). Elsewhere (a GPU,
a CPU without bf16 units) the checkpoint's own dtype is kept, as before. ``--dtype`` wins.

Example:

>>> import torch
>>> choice = inference_dtype(torch.device("cpu"), requested="float32")
>>> choice.dtype, choice.reason
(torch.float32, 'as asked (--dtype)')
>>> inference_dtype(torch.device("cpu"), cpu_bf16=True).name
'bfloat16'
>>> inference_dtype(torch.device("cpu"), cpu_bf16=False).dtype is None   # the checkpoint's
True
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from paligemma_xray.model.loading import resolve_dtype

#: CPU features that make bfloat16 matmul native (torch.cpu.get_capabilities' names, which
#: are also /proc/cpuinfo's flags on x86).
BF16_FEATURES = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The CPU's native-bfloat16 features present (empty: none, bf16 would be emulated).

    From ``torch.cpu.get_capabilities()`` (torch's own cpuinfo probe); on a torch without
    it, from the ``flags`` line of ``/proc/cpuinfo``.
    """
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        capabilities = probe()
        return tuple(name for name in BF16_FEATURES if capabilities.get(name))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    return bf16_flags(text)


def bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The native-bfloat16 features named on ``/proc/cpuinfo``'s ``flags`` (x86) or
    ``Features`` (ARM) lines of ``cpuinfo``."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return tuple(name for name in BF16_FEATURES if name in flags)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (AMX, AVX-512 BF16, ARM BF16)
    and oneDNN may use those units: ``ONEDNN_MAX_CPU_ISA`` capped below them (the demo pins
    AVX2 for reproducible figures) makes bfloat16 emulated again."""
    return bool(cpu_bf16_features()) and onednn_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA"))


def onednn_allows_bf16(max_isa: str | None) -> bool:
    """Whether oneDNN's ``ONEDNN_MAX_CPU_ISA`` cap (None: unset) leaves the bf16 units in use.

    >>> onednn_allows_bf16(None), onednn_allows_bf16("AVX2"), onednn_allows_bf16("avx512_core_amx")
    (True, False, True)
    """
    if not max_isa or max_isa.upper() == "ALL":
        return True
    return any(part in max_isa.upper() for part in ("BF16", "AMX", "FP16", "AVX10"))


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype the weights are loaded in (``None``: the checkpoint's) and why."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str | None:
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")


def inference_dtype(
    device: str | torch.device,
    requested: str | torch.dtype | None = None,
    *,
    cpu_bf16: bool | None = None,
) -> DtypeChoice:
    """The weights' dtype for inference on ``device``: ``requested`` (``--dtype``) when given,
    bfloat16 on a CPU with native bf16 matmul, else ``None`` (keep the checkpoint's).

    ``cpu_bf16``: whether the CPU has native bf16 (default: :func:`cpu_has_native_bf16`).
    """
    chosen = resolve_dtype(requested)
    if chosen is not None:
        return DtypeChoice(chosen, "as asked (--dtype)")
    if torch.device(device).type != "cpu":
        return DtypeChoice(None, "the checkpoint's; --dtype overrides")
    native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    if native:
        features = "/".join(cpu_bf16_features()) or "bf16"
        return DtypeChoice(
            torch.bfloat16, f"this CPU has native bfloat16 matmul ({features}); --dtype overrides"
        )
    return DtypeChoice(None, "the checkpoint's (this CPU has no native bfloat16 matmul); --dtype overrides")


_announced: set[str] = set()


def announce(line: str) -> None:
    """Print ``line`` on stderr once per process (an ensemble loads several models)."""
    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr, flush=True)


def dtype_name(model: torch.nn.Module) -> str:
    """The dtype the bulk of ``model``'s weights are in (its input embedding's), e.g. ``bfloat16``."""
    get = getattr(model, "get_input_embeddings", None)
    weight = get().weight if get is not None else next(model.parameters())
    return str(weight.dtype).removeprefix("torch.")
