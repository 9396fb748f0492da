"""Which dtype inference loads the weights in: bfloat16 on a CPU with native bf16, --dtype wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paligemma_xray.errors import CheckpointError
from paligemma_xray.model import dtypes
from paligemma_xray.model.dtypes import bf16_flags, inference_dtype

# /proc/cpuinfo excerpts: an AVX-512 BF16 server (no AMX), a Sapphire Rapids (AMX), an
# AVX2-only desktop, and a Neoverse V1 (ARM, "Features").
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AVX2 = "flags\t\t: fpu sse2 avx avx2 fma\n"
NEOVERSE = "Features\t: fp asimd sve bf16 i8mm svebf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [(ZEN4, ("avx512_bf16",)), (SPR, ("amx_bf16", "avx512_bf16")), (AVX2, ()), (NEOVERSE, ("bf16",))],
)
def test_bf16_flags_from_cpuinfo(cpuinfo, expected):
    assert bf16_flags(cpuinfo) == expected


def test_cpu_probe_agrees_with_proc_cpuinfo():
    """torch's probe and the kernel's flags name the same x86 bf16 features on this machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "flags" not in text:
        pytest.skip("not an x86 Linux")
    assert set(dtypes.cpu_bf16_features()) == set(bf16_flags(text))


def test_bfloat16_on_a_bf16_cpu_else_the_checkpoints():
    cpu = torch.device("cpu")
    assert inference_dtype(cpu, cpu_bf16=True).dtype is torch.bfloat16
    assert inference_dtype(cpu, cpu_bf16=False).dtype is None
    assert inference_dtype("cuda", cpu_bf16=True).dtype is None  # a GPU: unchanged, the checkpoint's
    assert inference_dtype("cpu", "float32", cpu_bf16=True).dtype is torch.float32  # --dtype wins
    assert inference_dtype("cpu", "float16", cpu_bf16=True).reason == "as asked (--dtype)"


def test_unknown_dtype_is_refused():
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        inference_dtype("cpu", "int8")
