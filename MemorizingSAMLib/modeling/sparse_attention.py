"""Grouped ("3D sparse") attention for our own models.

FastSAM3D's "3D sparse flash attention" restricts which tokens attend to each other. Ours: each token attends
only within its group of g^3 tokens. Blocks alternate two groupings so that information still crosses the whole
grid within two blocks:
- contiguous: the grid is cut into (G/g)^3 cubes of g^3 neighbouring tokens;
- dilated: a group is every (G/g)-th token along each axis, i.e. tokens sharing (a mod G/g, b mod G/g, c mod G/g).

FLOPs of the attention core (QK^T and PV, multiply-adds counted as 2) for N = G^3 tokens of width C:
    dense   4 * N^2 * C
    grouped 4 * N * g^3 * C       (a factor N / g^3 fewer; for G = 8, g = 2: 64x fewer)
The qkv, output projection and MLP, which dominate at N = 512, are unchanged. No relative-position bias: the
published checkpoints never run through this path (EncoderConfig.validate enforces rel-pos off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_groups(x: torch.Tensor, g: int, group: int, dilated: bool) -> torch.Tensor:
    """(B, h, G^3, hd) -> (B, h, n_groups, group^3, hd)."""
    b, h, _, hd = x.shape
    m = g // group
    x = x.reshape(b, h, g, g, g, hd)
    if dilated:
        # token (a, b, c) = (i*m + r1, ...): the group is (r1, r2, r3), position (i, j, k).
        x = x.reshape(b, h, group, m, group, m, group, m, hd).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
    else:
        x = x.reshape(b, h, m, group, m, group, m, group, hd).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(b, h, m**3, group**3, hd)


def _from_groups(x: torch.Tensor, g: int, group: int, dilated: bool) -> torch.Tensor:
    b, h, _, _, hd = x.shape
    m = g // group
    x = x.reshape(b, h, m, m, m, group, group, group, hd)
    if dilated:
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
    else:
        x = x.permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
    return x.reshape(b, h, g**3, hd)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int, group: int, dilated: bool, scale: float
) -> torch.Tensor:
    """Attention restricted to token groups. q, k, v: (B, h, G^3, hd) -> (B, h, G^3, hd)."""
    qg, kg, vg = (_to_groups(t, g, group, dilated) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    return _from_groups(out, g, group, dilated)
