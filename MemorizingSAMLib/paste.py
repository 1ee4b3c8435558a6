"""From low-res logits of a crop to the changed region of a full-resolution mask (the click path's last step).

Never upsamples the whole crop: the positive low-res voxels give an exact bound of where the trilinearly
interpolated logits can be positive; only the volume voxels in that bound (plus the region the previous result of
the same crop occupied, which must be cleared) are sampled, straight from the 32^3 logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import CropGrid, Geometry, ijk_to_crop_affine
from .prompts import Region


def crop_box_to_region(geom: Geometry, grid: CropGrid, lo_xyz, hi_xyz) -> Region:
    """The volume voxels whose centres may fall inside the crop-space box [lo_xyz, hi_xyz] (continuous)."""
    # Plain Python floats: this runs once per click right after the model, when every numpy call costs ~10 us
    # (caches flushed by the decoder; measured 245 us for the numpy version, 65 us when repeated at once).
    m = geom.ras_to_ijk_matrix  # cached on the geometry
    rot, t = m[:3, :3].tolist(), m[:3, 3].tolist()
    sp, org = grid.spacing, grid.origin_ras
    lo, hi = [], []
    for r in range(3):
        # ijk_r = sum_c rot[r][c] * (xyz_c * sp + org_c) + t_r: linear in xyz, extremes at the box's corners
        base = t[r] + sum(rot[r][c] * org[c] for c in range(3))
        terms = [(rot[r][c] * sp * float(lo_xyz[c]), rot[r][c] * sp * float(hi_xyz[c])) for c in range(3)]
        vmin = base + sum(min(a, b) for a, b in terms)
        vmax = base + sum(max(a, b) for a, b in terms)
        n = geom.size[r]
        lo.append(min(max(math.floor(vmin), 0), n))
        hi.append(min(max(math.ceil(vmax) + 1, 0), n))
    return Region(tuple(lo), tuple(hi))


def positive_region(low: torch.Tensor, geom: Geometry, grid: CropGrid) -> Region | None:
    """Volume region outside which the upsampled logits of ``low`` (1, 1, L, L, L) cannot be positive; None if
    no low-res voxel is positive.

    A crop point c has low-res coordinate (c + 0.5) / f - 0.5 with f = crop size / L; its interpolated logit mixes
    the (clamped) neighbouring low-res voxels only, so positives lie within c in [f*l0 - f/2 - 0.5, f*l1 + 3f/2 - 0.5]
    for the positive low-res bounding box [l0, l1].
    """
    m = low[0, 0]
    plane = m.amax(dim=2)  # max over z: (x, y)
    # per axis x, y, z: the indices holding some positive voxel
    along = (torch.stack([plane.amax(dim=1), plane.amax(dim=0), m.amax(dim=(0, 1))]) > 0).tolist()
    if not any(along[0]):
        return None
    f = grid.size / low.shape[-1]
    lo, hi = [], []
    for axis in along:
        l0, l1 = axis.index(True), len(axis) - 1 - axis[::-1].index(True)
        lo.append(max(f * l0 - f / 2 - 0.5, -0.5))
        hi.append(min(f * l1 + 1.5 * f - 0.5, grid.size - 0.5))
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
    m[rows, i0] = 1 - w
    m[rows, i1] += w  # i1 == i0 at the clamped border: the weights add up to 1 there
    return torch.from_numpy(m)


@dataclass
class Tile:
    """One box of a sampled region: ``positive`` is a bool [k, j, i] array shaped like ``region``; ``inside`` None
    when every voxel lies in the crop, else a bool array marking those that do (the others keep what the mask had).
    ``positive`` may be a view of scratch memory, valid until the next tile is produced."""

    region: Region
    positive: np.ndarray
    inside: np.ndarray | None = None


class PasteScratch:
    """Working buffers reused from click to click (an explicit cache: fresh multi-MB buffers every click cost
    thousands of page faults). ``tile_voxels`` bounds one tile so that its float products stay in cache."""

    def __init__(self, tile_voxels: int = 1 << 19) -> None:
        self.tile_voxels = tile_voxels
        self._buffers: dict[str, torch.Tensor] = {}
        # Separable-interpolation plans by (crop transform, region): a refinement click usually repeats the
        # paste's region and the edge refinement's widened one, so a few entries cover a click loop.
        self._plans: OrderedDict[tuple, object] = OrderedDict()
        self.max_plans = 4

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of at least ``n`` elements (contents undefined)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, self.tile_voxels), dtype=dtype)
            self._buffers[name] = buf
        return buf[:n]

    def plan(self, key: tuple, make: Callable[[], object]) -> object:
        """The cached plan for ``key``, made by ``make()`` on a miss (least recently used entries dropped)."""
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        value = make()
        self._plans[key] = value
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return value


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops in the block on one thread, then restore the thread count.

    The paste's products are small (a few thousand rows x ~10 x ~80 per call). On this shared 2-core machine a
    parallel region waits for its slowest thread: in slow phases one thread pasted in 5.7 / 6.5 ms where two took
    9.3 / 9.8 (A/B in the click loop, two runs); in fast phases two threads were ~0.7 ms faster (4 runs)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sample_tiles(
    low: torch.Tensor, geom: Geometry, grid: CropGrid, region: Region, scratch: PasteScratch | None = None
):
    """Threshold the trilinearly interpolated logits at the volume voxels of ``region`` that lie in the crop,
    tile by tile (an iterator of :class:`Tile`; together the tiles cover the sampled part of ``region``).

    Axis-aligned volumes take a separable path: the region is clipped to the crop, the two outer axes are
    interpolated once for the whole region (a small [k', j', L] array), and each tile of whole (k', j') rows gets
    its last axis by one matrix product into scratch memory (no per-voxel gathers, no fresh allocations).
    Oblique volumes sample every voxel with grid_sample, as one tile.
    """
    a, b = ijk_to_crop_affine(geom, grid)
    perm = axis_permutation(a)
    if perm is None:
        positive, inside = _sample_general(low, a, b, grid, region)
        yield Tile(region, positive, inside)
        return
    yield from _sample_separable(low, a, b, perm, grid, region, scratch or PasteScratch())


def sample_region(
    low: torch.Tensor, geom: Geometry, grid: CropGrid, region: Region
) -> tuple[Region, np.ndarray, np.ndarray | None]:
    """:func:`sample_tiles` assembled into one array: (sub, positive, inside) with ``sub`` the sampled part of
    ``region``, ``positive`` a bool [k, j, i] array shaped like ``sub`` and ``inside`` as in :class:`Tile`."""
    tiles = [Tile(t.region, t.positive.copy(), t.inside) for t in sample_tiles(low, geom, grid, region)]
    if len(tiles) == 1 and tiles[0].inside is not None:
        return tiles[0].region, tiles[0].positive, tiles[0].inside
    sub = Region(tiles[0].region.lo, tiles[0].region.hi)
    for t in tiles[1:]:
        sub = sub.union(t.region)
    positive = np.zeros(np.subtract(sub.hi, sub.lo)[::-1], dtype=bool)
    for t in tiles:
        if not t.region.empty:
            rel = tuple(slice(s.start - o, s.stop - o) for s, o in zip(t.region.slices, sub.lo[::-1]))
            positive[rel] = t.positive
    return sub, positive, None


def sample_logits(
    low: torch.Tensor, geom: Geometry, grid: CropGrid, region: Region, scratch: PasteScratch | None = None
) -> tuple[Region, np.ndarray, np.ndarray | None]:
    """The trilinearly interpolated logits themselves (float32 [k, j, i]) at the volume voxels of ``region``:
    (sub, logits, inside) as in :func:`sample_region`, for steps that need more than their sign (edge_refine.py).
    One array, not tiles: such steps work on a region around one structure."""
    a, b = ijk_to_crop_affine(geom, grid)
    perm = axis_permutation(a)
    lsize = low.shape[-1]
    if perm is None:
        vals, inside = _grid_sample_values(low, a, b, grid, region)
        return region, np.where(inside, vals, np.float32(-30.0)), inside
    plan = _cached_plan(a, b, perm, grid, region, lsize, scratch or PasteScratch())
    if plan is None:
        return Region(region.lo, region.lo), np.zeros((0, 0, 0), np.float32), None
    lp = low[0, 0].float().cpu().permute(*plan.low_axes)
    t = (plan.w_k @ lp.reshape(lsize, -1)).view(-1, lsize, lsize)  # [k', b, c]
    t = torch.matmul(plan.w_j, t)  # [k', j', c]
    vals = torch.matmul(t, plan.w_i.T)  # [k', j', i']
    return plan.sub, vals.numpy(), None


@dataclass
class _SeparablePlan:
    """What a separable paste of one region from one crop needs besides the logits (reused while both repeat)."""

    sub: Region  # the part of the region inside the crop
    w_k: torch.Tensor  # (k', L) interpolation weights per volume axis
    w_j: torch.Tensor
    groups: list  # of the i axis, see _column_groups
    w_i: torch.Tensor
    low_axes: tuple[int, int, int]  # low-res tensor axes feeding volume axes k, j, i


def _separable_plan(a, b, perm, grid: CropGrid, region: Region, lsize: int) -> _SeparablePlan | None:
    s = grid.size
    crop_axis_of = {v: c for c, v in enumerate(perm)}  # volume axis -> crop axis
    lo, hi = list(region.lo), list(region.hi)
    weights = {}
    for v in (2, 1, 0):
        c = crop_axis_of[v]
        n = np.arange(region.lo[v], region.hi[v])
        coord = a[c, v] * n.astype(np.float64) + b[c]
        ok = np.nonzero((coord >= -0.5) & (coord <= s - 0.5))[0]
        if ok.size == 0:
            return None
        lo[v], hi[v] = int(n[ok[0]]), int(n[ok[-1]]) + 1
        weights[v] = _interp_matrix(coord[ok[0] : ok[-1] + 1], lsize, s)
    axes = (crop_axis_of[2], crop_axis_of[1], crop_axis_of[0])
    return _SeparablePlan(
        Region(tuple(lo), tuple(hi)), weights[2], weights[1], _column_groups(weights[0]), weights[0], axes
    )


def _cached_plan(a, b, perm, grid: CropGrid, region: Region, lsize: int, scratch: PasteScratch):
    key = (a.tobytes(), b.tobytes(), tuple(perm), grid, region, lsize)
    return scratch.plan(key, lambda: _separable_plan(a, b, perm, grid, region, lsize))


def _sample_separable(low, a, b, perm, grid: CropGrid, region: Region, scratch: PasteScratch):
    lsize = low.shape[-1]
    plan = _cached_plan(a, b, perm, grid, region, lsize, scratch)
    if plan is None:
        yield Tile(Region(region.lo, region.lo), np.zeros((0, 0, 0), bool))
        return
    lo, hi = plan.sub.lo, plan.sub.hi
    nk, nj, ni = hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]
    lp = low[0, 0].float().cpu().permute(*plan.low_axes)
    with single_threaded():
        t = (plan.w_k @ lp.reshape(lsize, -1)).view(-1, lsize, lsize)  # [k', b, c]
        t = torch.matmul(plan.w_j, t)  # [k', j', c]
    # Tiles of whole (k', j') rows: several k' planes when a plane is small, else runs of j' rows of one plane.
    rows = max(1, scratch.tile_voxels // ni)
    kstep, jstep = (max(1, rows // nj), nj) if rows >= nj else (1, rows)
    for k0 in range(0, nk, kstep):
        k1 = min(nk, k0 + kstep)
        for j0 in range(0, nj, jstep):
            j1 = min(nj, j0 + jstep)
            n = (k1 - k0) * (j1 - j0)
            src = t[k0:k1, j0:j1].reshape(n, lsize)
            vals = scratch.get("vals", n * ni, torch.float32).view(n, ni)
            with single_threaded():
                for c0, c1, l0, l1, w in plan.groups:
                    torch.mm(src[:, l0:l1], w, out=vals[:, c0:c1])
            pos = scratch.get("positive", n * ni, torch.bool).numpy().reshape(k1 - k0, j1 - j0, ni)
            # numpy's float -> bool comparison runs ~5x faster than torch.gt here (measured, 2^18 voxels).
            np.greater(vals.numpy().reshape(pos.shape), 0, out=pos)
            tile = Region((lo[0], lo[1] + j0, lo[2] + k0), (hi[0], lo[1] + j1, lo[2] + k1))
            yield Tile(tile, pos)


def _column_groups(w: np.ndarray | torch.Tensor, width: int = 80) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Split an (n, L) interpolation matrix (2 non-zeros per row) into runs of ~``width`` output columns, each with
    the low-res columns it reads: (c0, c1, l0, l1, weight (l1 - l0, c1 - c0)). Products over only those columns
    skip the zeros (3.5 M voxels: ~4x fewer multiply-adds, ~25 % faster) and give the same sums."""
    w_np = np.asarray(w)
    n = w_np.shape[0]
    out = []
    for c0 in range(0, n, width):
        c1 = min(n, c0 + width)
        used = np.flatnonzero(w_np[c0:c1].any(0))
        l0, l1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        out.append((c0, c1, l0, l1, torch.from_numpy(np.ascontiguousarray(w_np[c0:c1, l0:l1].T))))
    return out


def _grid_sample_values(low, a, b, grid: CropGrid, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated logits (float32 [k, j, i]) at every voxel of ``region`` and the bool mask of those in the crop."""
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
    return vals.view(xyz.shape[:3]).cpu().numpy(), inside


def _sample_general(low, a, b, grid: CropGrid, region: Region) -> tuple[np.ndarray, np.ndarray]:
    vals, inside = _grid_sample_values(low, a, b, grid, region)
    return (vals > 0) & inside, inside
