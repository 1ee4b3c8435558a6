"""Memory attention (Memorizing SAM, arXiv 2412.13908), done the way the paper describes it.

One encoder block (the memory layer) attends over its own tokens (local attention, unchanged) and, separately,
over the keys and values that the same layer produced for k retrieved reference crops:

    O_mem = sum_n w_n * softmax(s * q K_n^T) V_n,     w_n = (1 / (d_n + eps)) / sum_m (1 / (d_m + eps))
    O     = r * O_local + (1 - r) * O_mem

with d_n the descriptor distance of neighbour n and r the local ratio (paper: 0.3 local, 0.7 memory), or, for
models we train with ``memory_gate``, r = sigmoid(gate_h) per head. Differences from the released code, each
deliberate: the memory keys' attention weights are used (released code discards them and averages values), the
neighbour weights decrease with distance (released code's grow with it), and retrieval runs on compact pooled
descriptors (released code compares raw 128^3 voxel vectors, 8 MB each). Memory keys carry no relative-position
bias: positions in another case's crop do not relate to this one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class RetrievedMemory:
    """Keys and values of the memory layer for n retrieved entries, and how to mix them in.

    keys, values: (n, heads, M, head_dim); weights: (n,) summing to 1; local_ratio: r above.
    """

    keys: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    local_ratio: float = 0.3

    @property
    def active(self) -> bool:
        return self.keys.shape[0] > 0 and self.local_ratio < 1.0


class MemoryProvider(Protocol):
    """What the encoder asks at its memory layer: given the tokens entering that block, the memory to use."""

    layer: int

    def retrieve(self, tokens: torch.Tensor) -> RetrievedMemory | None: ...


# Descriptor: per-channel mean and std of the tokens entering the memory layer (2C numbers), L2-normalised, then
# a fixed random orthonormal projection to DESCRIPTOR_DIM (Johnson-Lindenstrauss: distances are kept to a few
# percent) so that exact top-k over 10 000 entries reads 10 MB instead of 61 MB. Banks record this spec.
DESCRIPTOR_DIM = 256
DESCRIPTOR_SEED = 20241218
DESCRIPTOR_SPEC = {"kind": "token_mean_std_random_projection", "dim": DESCRIPTOR_DIM, "seed": DESCRIPTOR_SEED}
_PROJECTIONS: dict[int, torch.Tensor] = {}


def _projection(in_dim: int) -> torch.Tensor:
    """(in_dim, DESCRIPTOR_DIM) orthonormal columns, the same on every machine (seeded CPU generator)."""
    if in_dim not in _PROJECTIONS:
        g = torch.Generator().manual_seed(DESCRIPTOR_SEED)
        a = torch.randn(in_dim, max(DESCRIPTOR_DIM, 1), generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(a)
        _PROJECTIONS[in_dim] = q[:, :DESCRIPTOR_DIM].float().contiguous()
    return _PROJECTIONS[in_dim]


def memory_descriptor(tokens: torch.Tensor) -> torch.Tensor:
    """Retrieval descriptor of channel-last tokens (B, G, G, G, C): float32 (B, DESCRIPTOR_DIM), unit norm
    (512 bytes per entry in fp16)."""
    t = tokens.float().flatten(1, 3)
    d = F.normalize(torch.cat([t.mean(1), t.std(1)], dim=-1), dim=-1)
    if d.shape[-1] > DESCRIPTOR_DIM:
        d = F.normalize(d @ _projection(d.shape[-1]).to(d.device), dim=-1)
    return d


def inverse_distance_weights(distances: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised weights that decrease with distance: (1 / (d + eps)) / sum."""
    w = 1.0 / (distances.clamp_min(0) + eps)
    return w / w.sum()


def attend_memory(q: torch.Tensor, memory: RetrievedMemory, scale: float) -> torch.Tensor:
    """O_mem for queries (B, h, N, hd): per neighbour a full softmax over its keys, then the weighted sum."""
    k = memory.keys.to(q.dtype)
    v = memory.values.to(q.dtype)
    out = None
    for n in range(k.shape[0]):
        o = F.scaled_dot_product_attention(
            q, k[n : n + 1].expand(q.shape[0], -1, -1, -1), v[n : n + 1].expand(q.shape[0], -1, -1, -1), scale=scale
        )
        o = o * memory.weights[n].to(q.dtype)
        out = o if out is None else out + o
    return out
