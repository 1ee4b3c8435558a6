"""What this machine's CPU can do for the model, asked in one place.

Machines differ (AVX2-only and AVX-512 CPUs, with or without native bf16): nothing else in the project tests a CPU
feature. oneDNN's bfloat16 kernels (packed bf16 weights) need AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX; without them
oneDNN refuses ("bf16 path needs the cpu support ..."), while ATen's own bf16 kernels still run, slowly. So bf16
work falls back to those, and callers that choose bf16 for speed are told it is slower here.

``MEMSAM_CPU_BF16=0`` forces the answer to "no" (to try an AVX2-only machine's paths on an AVX-512 one, with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``, which torch itself honours).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

FORCE_BF16_ENV = "MEMSAM_CPU_BF16"
# The /proc/cpuinfo flags that decide which kernels run; recorded by the benchmarks.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "avx_ne_convert",
    "amx_bf16",
    "amx_tile",
)


@dataclass(frozen=True)
class Capabilities:
    """``onednn``: packed fp32 products through oneDNN; ``onednn_bf16``: packed bf16 products too;
    ``aten_isa``: the vector ISA ATen dispatches to (AVX512, AVX2, ...); ``flags``: the relevant CPU flags."""

    onednn: bool
    onednn_bf16: bool
    aten_isa: str
    cpu: str
    flags: tuple[str, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(f for f in RELEVANT_FLAGS if f in have)
    except OSError:
        pass
    return ()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def capabilities() -> Capabilities:
    """This process's answer (computed once: it depends on the CPU and the environment at start-up)."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    bf16 = False
    if onednn:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            bf16 = bool(check()) if check is not None else False
        except RuntimeError:
            bf16 = False
    if os.environ.get(FORCE_BF16_ENV, "").strip() == "0":
        bf16 = False
    return Capabilities(onednn, bf16, torch.backends.cpu.get_cpu_capability(), _cpu_name(), _cpu_flags())


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """bf16 products at full speed on ``device`` (CUDA: left to torch; CPU: oneDNN's bf16 kernels)."""
    device = torch.device(device)
    return device.type != "cpu" or capabilities().onednn_bf16


def bf16_note(device: torch.device | str = "cpu") -> str | None:
    """One line for a caller that chose bf16 for speed where it is not faster, else None."""
    if native_bf16(device):
        return None
    return (
        "this CPU has no native bf16 (oneDNN needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX): bf16 products run on "
        "slower generic kernels; the exact float32 default is faster here"
    )
