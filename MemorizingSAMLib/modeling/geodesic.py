"""Geodesic distances on a small grid, vectorised for the click path (click_maps.py).

A path's cost is the sum over its 6-connected steps of ``1 + lam * |I(a) - I(b)|``: voxel steps plus ``lam`` times
the intensity change it crosses, so a path that stays inside a homogeneous region costs its length and one that
crosses an edge pays for the edge (as in DeepIGeoS's geodesic maps of the clicks). The distance from a set of seeds
is computed by sweeps along each axis in turn: along one axis, with S(i) the cost of the steps before i,

    d(i) = min_j d(j) + |S(i) - S(j)| = min( S(i) + min_{j<=i} (d(j) - S(j)),  min_{j>=i} (d(j) + S(j)) - S(i) ),

two cumulative minima, exact for the paths along that axis. Repeating the (x, y, z) sweeps ``rounds`` times gives
the exact minimum over paths that change axis at most 3 ``rounds`` - 1 times: an upper bound of the 6-connected
geodesic distance, deterministic and the same in training and at a click, which is all a feature needs.
"""

from __future__ import annotations

import torch

# Larger than any path on the grids used here (32^3 low-res voxels), small enough to stay exact in float32 sums.
FAR = 1.0e4


def _scan(x: torch.Tensor, axis: int, op, reverse: bool = False) -> torch.Tensor:
    """Inclusive prefix ``op`` (torch.minimum / torch.add) of ``x`` along ``axis`` (from the end with ``reverse``),
    by log2(n) shifted steps (Hillis-Steele): on a 32-voxel axis 4-5x faster on CPU than torch.cummin, which also
    computes indices, and than torch.cumsum along a non-last axis."""
    y = x.clone()
    n, k = x.shape[axis], 1
    while k < n:
        a, b = (y.narrow(axis, 0, n - k), y.narrow(axis, k, n - k))
        dst, src = (a, b) if reverse else (b, a)
        dst.copy_(op(dst, src))  # op makes a new tensor from the old values first, so the overlap is safe
        k *= 2
    return y


def geodesic_distance(image: torch.Tensor, seeds: torch.Tensor, lam: float, rounds: int = 2) -> torch.Tensor:
    """Distances (B, K, X, Y, Z) in voxel steps from the seed voxels of each of K seed maps.

    Args:
        image: (B, X, Y, Z) intensities, any axis order as long as ``seeds`` shares it.
        seeds: (B, K, X, Y, Z) bool, True at seed voxels. A map with no seed gives FAR everywhere.
        lam: weight of the absolute intensity change per step (intensity units^-1); 0 gives the 6-connected city
            block distance (exact after one round).
        rounds: sweeps over the three axes.
    """
    if image.dim() != 4 or seeds.dim() != 5 or seeds.shape[0] != image.shape[0] or seeds.shape[2:] != image.shape[1:]:
        raise ValueError(f"image (B, X, Y, Z) and seeds (B, K, X, Y, Z) must match, got {image.shape}, {seeds.shape}")
    img = image[:, None]  # (B, 1, X, Y, Z), shared by the K maps
    prefix = []
    for axis in (2, 3, 4):
        n = img.shape[axis]
        step = 1.0 + lam * (img.narrow(axis, 1, n - 1) - img.narrow(axis, 0, n - 1)).abs()
        # S(i): cost of the steps before voxel i along this axis (S(0) = 0).
        prefix.append(_scan(torch.cat([torch.zeros_like(img.narrow(axis, 0, 1)), step], axis), axis, torch.add))
    d = torch.full(seeds.shape, FAR, dtype=image.dtype, device=image.device).masked_fill_(seeds, 0.0)
    for _ in range(rounds):
        for axis, s in zip((2, 3, 4), prefix):
            fwd = _scan(d - s, axis, torch.minimum).add_(s)
            bwd = _scan(d + s, axis, torch.minimum, reverse=True).sub_(s)
            d = torch.minimum(fwd, bwd).clamp_(max=FAR)
    return d
