"""What the machine does fast: decides the ``auto`` dtype of training and serving.

bf16 matmuls run on dedicated instructions (AVX-512 BF16, AMX) on recent x86 CPUs and are then several
times faster than fp32 (measured here: 148 vs 31 GFLOP/s on one AMD EPYC core with AVX-512 BF16); on a CPU
without them torch emulates bf16 and it is > 10x *slower* than fp32 (an AVX2-only EPYC, an earlier
session's machine). Machines of the same name differ, so this reads the CPU flags instead of assuming.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

#: CPU flags (``/proc/cpuinfo``) of native bf16 dot products.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls are native: CUDA devices that support bf16, CPUs with AVX-512 BF16 or AMX."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(BF16_FLAGS & cpu_flags())


def auto_dtype(device: str = "cpu") -> str:
    """``bfloat16`` where it is fast (see :func:`fast_bf16`), else ``float32``."""
    return "bfloat16" if fast_bf16(device) else "float32"


def cpu_kind(device: str = "cpu") -> str:
    """The machine class of a run, in a word for its records: ``cuda``, or the CPU's widest vector feature
    (``avx512_bf16``, ``avx512``, ``avx2``, else ``other``). Sessions here get AVX2-only or AVX-512 BF16 CPUs by
    chance, and a step's time and a float's rounding differ between them."""
    if device.startswith("cuda"):
        return "cuda"
    flags = cpu_flags()
    if BF16_FLAGS & flags:
        return "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
