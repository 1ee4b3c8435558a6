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

    keys, values: (n, heads, M, head_dim); weights: (n,) summing to 1; local_ratio: r above; foreground: (n, M)
    fraction of each memory token's patch inside the reference's segmentation (for mask-aware values), or None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    local_ratio: float = 0.3
    foreground: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.keys.shape[0] > 0 and self.local_ratio < 1.0


class MemoryProvider(Protocol):
    """What the encoder asks at its memory layer: given the tokens entering that block, the memory to use."""

    layer: int

    def retrieve(self, tokens: torch.Tensor) -> RetrievedMemory | None: ...


# Descriptors are L2-normalised, then a fixed random orthonormal projection takes them to DESCRIPTOR_DIM
# (Johnson-Lindenstrauss: distances are kept to a few percent) so that exact top-k over 10 000 entries reads 10 MB
# instead of 61 MB. Banks record the spec; a model config names its kind.
#   token_mean_std_random_projection: per-channel mean and std of all tokens entering the memory layer (2C).
#   mirror_pooled_random_projection: the tokens averaged with their left-right mirror (tensor axis x = R), then
#     mean-pooled over the 2x2x2 octants of the grid (8C): where things are in the crop counts, and a structure's
#     contralateral twin (bilateral anatomy) is as near as itself. Measured on Colin27/AAL with our student: the
#     twin is among the 3 nearest for 46 of 54 right-hemisphere structures, against 19 with mean/std.
DESCRIPTOR_DIM = 256
DESCRIPTOR_SEED = 20241218
DEFAULT_DESCRIPTOR = "token_mean_std_random_projection"
_PROJECTIONS: dict[int, torch.Tensor] = {}


def descriptor_spec(kind: str = DEFAULT_DESCRIPTOR) -> dict:
    if kind not in _DESCRIPTORS:
        raise ValueError(f"unknown memory descriptor {kind!r}; known: {sorted(_DESCRIPTORS)}")
    return {"kind": kind, "dim": DESCRIPTOR_DIM, "seed": DESCRIPTOR_SEED}


def _projection(in_dim: int) -> torch.Tensor:
    """(in_dim, DESCRIPTOR_DIM) orthonormal columns, the same on every machine (seeded CPU generator)."""
    if in_dim not in _PROJECTIONS:
        g = torch.Generator().manual_seed(DESCRIPTOR_SEED)
        a = torch.randn(in_dim, max(DESCRIPTOR_DIM, 1), generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(a)
        _PROJECTIONS[in_dim] = q[:, :DESCRIPTOR_DIM].float().contiguous()
    return _PROJECTIONS[in_dim]


def _mean_std(t: torch.Tensor) -> torch.Tensor:
    f = t.flatten(1, 3)
    return torch.cat([f.mean(1), f.std(1)], dim=-1)


def _mirror_pooled(t: torch.Tensor) -> torch.Tensor:
    b, g, c = t.shape[0], t.shape[1], t.shape[-1]
    s = (t + t.flip(1)) / 2
    return s.reshape(b, 2, g // 2, 2, g // 2, 2, g // 2, c).mean((2, 4, 6)).reshape(b, -1)


_DESCRIPTORS = {"token_mean_std_random_projection": _mean_std, "mirror_pooled_random_projection": _mirror_pooled}


def memory_descriptor(tokens: torch.Tensor, kind: str = DEFAULT_DESCRIPTOR) -> torch.Tensor:
    """Retrieval descriptor of channel-last tokens (B, G, G, G, C): float32 (B, DESCRIPTOR_DIM), unit norm
    (512 bytes per entry in fp16)."""
    d = F.normalize(_DESCRIPTORS[kind](tokens.float()), dim=-1)
    if d.shape[-1] > DESCRIPTOR_DIM:
        d = F.normalize(d @ _projection(d.shape[-1]).to(d.device), dim=-1)
    return d


def inverse_distance_weights(distances: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised weights that decrease with distance: (1 / (d + eps)) / sum."""
    w = 1.0 / (distances.clamp_min(0) + eps)
    return w / w.sum()


def attend_memory(
    q: torch.Tensor,
    memory: RetrievedMemory,
    scale: float,
    foreground_value: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """O_mem for queries (B, h, N, hd): per neighbour a full softmax over its keys, then the weighted sum.
    With ``foreground_value`` (h, hd), memory values become v + f * e_h (mask-aware values); with
    ``position_bias`` (h,), the memory key at the query's own token position gets +beta_h on its logit."""
    k = memory.keys.to(q.dtype)
    v = memory.values.to(q.dtype)
    bias = None
    if position_bias is not None:
        n, m = q.shape[2], k.shape[2]
        if n != m:
            raise ValueError(f"a same-position memory bias needs as many memory tokens as queries ({m} vs {n})")
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        bias = (position_bias.to(q.dtype).view(1, -1, 1, 1) * eye).expand(q.shape[0], -1, -1, -1)
    if foreground_value is not None:
        if memory.foreground is None:
            raise ValueError("this model uses mask-aware memory values: the memory must carry foreground fractions")
        f = memory.foreground.to(q.dtype)
        v = v + f[:, None, :, None] * foreground_value.to(q.dtype)[None, :, None, :]
    out = None
    for n in range(k.shape[0]):
        o = F.scaled_dot_product_attention(
            q,
            k[n : n + 1].expand(q.shape[0], -1, -1, -1),
            v[n : n + 1].expand(q.shape[0], -1, -1, -1),
            attn_mask=bias,
            scale=scale,
        )
        o = o * memory.weights[n].to(q.dtype)
        out = o if out is None else out + o
    return out
