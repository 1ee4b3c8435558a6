"""From low-res logits of a crop to the changed region of a full-resolution mask (the click path's last step).

Never upsamples the whole crop: the positive low-res voxels give an exact bound of where the trilinearly
interpolated logits can be positive; only the volume voxels in that bound (plus the region the previous result of
the same crop occupied, which must be cleared) are sampled, straight from the 32^3 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import CropGrid, Geometry, ijk_to_crop_affine


@dataclass(frozen=True)
class Region:
    """A box of voxels of the volume, half-open index ranges [lo, hi) in (i, j, k) order."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """numpy slices of a [k, j, i] array."""
        return (slice(self.lo[2], self.hi[2]), slice(self.lo[1], self.hi[1]), slice(self.lo[0], self.hi[0]))

    @property
    def empty(self) -> bool:
        return any(h <= l for l, h in zip(self.lo, self.hi))

    @property
    def voxels(self) -> int:
        return 0 if self.empty else int(np.prod(np.subtract(self.hi, self.lo)))

    def union(self, other: Region | None) -> Region:
        if other is None or other.empty:
            return self
        if self.empty:
            return other
        return Region(
            tuple(min(a, b) for a, b in zip(self.lo, other.lo)), tuple(max(a, b) for a, b in zip(self.hi, other.hi))
        )


def crop_box_to_region(geom: Geometry, grid: CropGrid, lo_xyz: np.ndarray, hi_xyz: np.ndarray) -> Region:
    """The volume voxels whose centres may fall inside the crop-space box [lo_xyz, hi_xyz] (continuous)."""
    a, b = ijk_to_crop_affine(geom, grid)
    inv = np.linalg.inv(a)
    corners = np.array(
        [[x, y, z] for x in (lo_xyz[0], hi_xyz[0]) for y in (lo_xyz[1], hi_xyz[1]) for z in (lo_xyz[2], hi_xyz[2])]
    )
    ijk = (corners - b) @ inv.T
    size = np.asarray(geom.size)
    lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, size)
    hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, size)
    return Region(tuple(int(v) for v in lo), tuple(int(v) for v in hi))


def positive_region(low: torch.Tensor, geom: Geometry, grid: CropGrid) -> Region | None:
    """Volume region outside which the upsampled logits of ``low`` (1, 1, L, L, L) cannot be positive; None if
    no low-res voxel is positive.

    A crop point c has low-res coordinate (c + 0.5) / f - 0.5 with f = crop size / L; its interpolated logit mixes
    the (clamped) neighbouring low-res voxels only, so positives lie within c in [f*l0 - f/2 - 0.5, f*l1 + 3f/2 - 0.5]
    for the positive low-res bounding box [l0, l1].
    """
    pos = (low[0, 0] > 0).nonzero()
    if pos.numel() == 0:
        return None
    l0 = pos.min(0).values.cpu().numpy().astype(np.float64)
    l1 = pos.max(0).values.cpu().numpy().astype(np.float64)
    f = grid.size / low.shape[-1]
    lo = np.maximum(f * l0 - f / 2 - 0.5, -0.5)
    hi = np.minimum(f * l1 + 1.5 * f - 0.5, grid.size - 0.5)
    return crop_box_to_region(geom, grid, lo, hi)


def axis_permutation(a: np.ndarray, tol: float = 1e-9) -> list[int] | None:
    """For an ijk -> crop affine matrix with one non-zero per row and column (volume axes parallel to the crop's,
    as for almost all clinical volumes), the volume axis feeding each crop axis; None for oblique volumes."""
    nz = np.abs(a) > tol * np.abs(a).max()
    if not (nz.sum(0) == 1).all() or not (nz.sum(1) == 1).all():
        return None
    return [int(np.argmax(nz[c])) for c in range(3)]


def _interp_matrix(coord: np.ndarray, low_size: int, crop_size: int) -> torch.Tensor:
    """(n, L) weights of linear interpolation (align_corners=False, border clamp) of a low-res axis at crop
    coordinates ``coord``."""
    f = crop_size / low_size
    t = np.clip((coord + 0.5) / f - 0.5, 0, low_size - 1)
    i0 = np.floor(t).astype(np.int64)
    w = t - i0
    i1 = np.minimum(i0 + 1, low_size - 1)
    m = np.zeros((coord.size, low_size), dtype=np.float32)
    rows = np.arange(coord.size)
    np.add.at(m, (rows, i0), 1 - w)
    np.add.at(m, (rows, i1), w)
    return torch.from_numpy(m)


def sample_region(
    low: torch.Tensor, geom: Geometry, grid: CropGrid, region: Region
) -> tuple[Region, np.ndarray, np.ndarray | None]:
    """Threshold the trilinearly interpolated logits at the volume voxels of ``region`` that lie in the crop.

    Returns (sub, positive, inside): ``sub`` is the part of ``region`` that was sampled, ``positive`` a bool
    [k, j, i] array shaped like ``sub``, and ``inside`` None when every voxel of ``sub`` lies in the crop, else a
    bool array marking those that do (the others keep whatever the mask had).

    Axis-aligned volumes take a separable path: ``sub`` is clipped to the crop, and three small matrix products
    (the last one writing [k, j, i] order directly) replace per-voxel sampling. Oblique volumes sample every voxel
    with grid_sample.
    """
    a, b = ijk_to_crop_affine(geom, grid)
    perm = axis_permutation(a)
    if perm is not None:
        return _sample_separable(low, a, b, perm, grid, region)
    positive, inside = _sample_general(low, a, b, grid, region)
    return region, positive, inside


def _sample_separable(low, a, b, perm, grid: CropGrid, region: Region):
    lsize, s = low.shape[-1], grid.size
    crop_axis_of = {v: c for c, v in enumerate(perm)}  # volume axis -> crop axis
    lo, hi = list(region.lo), list(region.hi)
    weights = {}
    for v in (2, 1, 0):
        c = crop_axis_of[v]
        n = np.arange(region.lo[v], region.hi[v])
        coord = a[c, v] * n.astype(np.float64) + b[c]
        ok = np.nonzero((coord >= -0.5) & (coord <= s - 0.5))[0]
        if ok.size == 0:
            return Region(tuple(lo), tuple(lo)), np.zeros((0, 0, 0), bool), None
        lo[v], hi[v] = int(n[ok[0]]), int(n[ok[-1]]) + 1
        weights[v] = _interp_matrix(coord[ok[0] : ok[-1] + 1], lsize, s)
    sub = Region(tuple(lo), tuple(hi))
    lp = low[0, 0].float().cpu().permute(crop_axis_of[2], crop_axis_of[1], crop_axis_of[0])
    t = (weights[2] @ lp.reshape(lsize, -1)).view(-1, lsize, lsize)  # [k', b, c]
    t = torch.matmul(weights[1], t)  # [k', j', c]
    positive = _interp_last_axis_positive(t.reshape(-1, lsize), weights[0].T.contiguous())
    return sub, positive.numpy().reshape(hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), None


def _interp_last_axis_positive(rows: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """(rows @ w_t) > 0 without materialising the float product: done in blocks of ~1 MB that stay in cache and
    are thresholded at once (measured 2.5 vs 4.1 ms for a 3.6 M-voxel region)."""
    n, cols = rows.shape[0], w_t.shape[1]
    out = torch.empty(n, cols, dtype=torch.bool)
    block = max(64, 262_144 // max(cols, 1))
    buf = torch.empty(min(block, n), cols)
    for s0 in range(0, n, block):
        m = min(block, n - s0)
        torch.mm(rows[s0 : s0 + m], w_t, out=buf[:m])
        torch.gt(buf[:m], 0, out=out[s0 : s0 + m])
    return out


def _sample_general(low, a, b, grid: CropGrid, region: Region) -> tuple[np.ndarray, np.ndarray]:
    (i0, j0, k0), (i1, j1, k1) = region.lo, region.hi
    i = np.arange(i0, i1, dtype=np.float32)
    j = np.arange(j0, j1, dtype=np.float32)
    k = np.arange(k0, k1, dtype=np.float32)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    # crop (x, y, z) of every voxel, laid out [k, j, i, 3]
    xyz = (
        k[:, None, None, None] * a32[:, 2] + j[None, :, None, None] * a32[:, 1] + i[None, None, :, None] * a32[:, 0]
    ) + b32
    s = grid.size
    inside = np.all((xyz >= -0.5) & (xyz <= s - 0.5), axis=-1)
    # grid_sample wants (W, H, D) = (z, y, x) order, normalised with align_corners=False: u = (c + 0.5) / s * 2 - 1.
    g = torch.from_numpy(xyz[..., ::-1].copy()).to(low.device)
    g = (g + 0.5) * (2.0 / s) - 1.0
    vals = F.grid_sample(
        low.float(), g.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=False
    )
    positive = (vals.view(xyz.shape[:3]) > 0).cpu().numpy()
    return positive & inside, inside
