"""Prepacked oneDNN weights for the large matrix products of CPU inference.

On CPU, ``F.linear`` hands the transposed weight to the BLAS every call; oneDNN with a weight reordered once
into its blocked layout runs the same product 15-30 % faster here (measured on the 2-core AVX-512 machine:
~150-185 -> ~200-215 GFLOP/s for the 512 x 768 x 3072 MLP product) and fuses the exact GELU.

The packed weights are an explicit cache held by the module that owns the weight (attribute ``_memsam_packed``,
one entry per compute dtype), created by :func:`pack_linears` (``Sam3D.prepare_for_inference``) or
:func:`ensure_packed`, and used only when still valid: no autograd, a CPU input of the packed dtype, and the
weight unchanged since packing (its version counter). Anything else takes the plain ``F.linear`` path (in the
input's dtype), so training, float64 and CUDA are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import capabilities

_ATTR = "_memsam_packed"


def _can_pack(dtype: torch.dtype) -> bool:
    """oneDNN can pack (and run) weights of ``dtype`` on this CPU (see MemorizingSAMLib.capabilities)."""
    caps = capabilities()
    return caps.onednn and (dtype == torch.float32 or (dtype == torch.bfloat16 and caps.onednn_bf16))


@dataclass
class PackedWeight:
    packed: torch.Tensor
    dtype: torch.dtype
    version: int
    data_ptr: int


def _valid(pack: PackedWeight | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        pack is not None
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == pack.dtype
        and weight._version == pack.version
        and weight.data_ptr() == pack.data_ptr
    )


def linear(
    x: torch.Tensor,
    owner: nn.Module,
    weight2d: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight2d, bias)`` (then exact GELU if ``gelu``), through the owner's packed weight if valid.

    ``weight2d`` is (out, in), or a function giving it when it must be derived (a convolution kernel reshaped):
    it is then only computed on the unpacked path. The version check uses the owner's own weight parameter.
    """
    packs = getattr(owner, _ATTR, None)
    pack = packs.get(x.dtype) if packs else None
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if _valid(pack, x, owner.weight):
        return torch.ops.mkldnn._linear_pointwise(x, pack.packed, bias, "gelu" if gelu else "none", [], "none")
    w = weight2d() if callable(weight2d) else weight2d
    y = F.linear(x, w.to(x.dtype), bias)  # a compute dtype other than the weight's: cast per call (unpacked)
    return F.gelu(y) if gelu else y


def pack_weight(
    owner: nn.Module, weight2d: torch.Tensor, batch_hint: int = 512, dtype: torch.dtype | None = None
) -> bool:
    """Pack ``weight2d`` (out, in) of ``owner`` for oneDNN inputs of ``dtype`` (default: the weight's own), replacing
    every other pack of the owner; False (nothing cached) where oneDNN cannot."""
    setattr(owner, _ATTR, None)
    return ensure_packed(owner, weight2d, batch_hint, dtype)


def ensure_packed(
    owner: nn.Module,
    weight2d: torch.Tensor | Callable[[], torch.Tensor],
    batch_hint: int = 512,
    dtype: torch.dtype | None = None,
) -> bool:
    """Add a pack of ``weight2d`` for inputs of ``dtype`` to the owner's packs unless a valid one is there (e.g. a
    bfloat16 copy of a float32 weight for reduced-precision products); False where oneDNN cannot."""
    w = owner.weight
    dtype = dtype or w.dtype
    packs = getattr(owner, _ATTR, None) or {}
    current = packs.get(dtype)
    if current is not None and current.version == w._version and current.data_ptr == w.data_ptr():
        return True
    if w.device.type != "cpu" or not _can_pack(dtype):
        return False  # the plain path (ATen's kernels) serves it
    w2d = weight2d() if callable(weight2d) else weight2d
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w2d.detach().to(dtype).contiguous(), batch_hint)
    packs[dtype] = PackedWeight(packed, dtype, w._version, w.data_ptr())
    setattr(owner, _ATTR, packs)
    return True


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose forward takes the packed path when one is cached."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self, self.weight, self.bias)


# For inputs of a few rows (the decoder's prompt tokens), small weights run faster through the plain BLAS call
# (measured for 16 rows: 384x192 35 vs 63 us, 384x384 63 vs 73 us) and large ones faster packed (384x2048:
# 163 vs 280 us); packing only weights from 2^19 elements up made a FastSAM3D click's decoder 11 % faster.
MIN_PACKED_ELEMENTS_FEW_ROWS = 2**19


def pack_linears(module: nn.Module, batch_hint: int) -> int:
    """Pack the :class:`Linear` layers below ``module`` for inputs of about ``batch_hint`` rows (for fewer than
    64 rows only the large ones, see above); unpack the others. Returns how many were packed."""
    n = 0
    for m in module.modules():
        if isinstance(m, Linear):
            if batch_hint >= 64 or m.weight.numel() >= MIN_PACKED_ELEMENTS_FEW_ROWS:
                n += int(pack_weight(m, m.weight, batch_hint))
            else:
                setattr(m, _ATTR, None)
    return n
