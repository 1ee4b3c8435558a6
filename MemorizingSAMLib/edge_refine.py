"""Edge-aware refinement of an upsampled mask at the volume's own resolution (a guided filter).

The model's logits live on a 3 mm grid (32^3 over a 96 mm crop); upsampled trilinearly they give masks whose
boundaries are 3 mm-smooth wherever the image has a sharper edge, which costs small structures most (on the
held-out phantoms the ground truth itself passed through that grid reaches Dice 0.90; region growing, working on
the voxels, reaches 0.99 on many). The guided filter (He, Sun and Tang, 2013) re-expresses the probability map,
in every window of a few mm, as the best affine function of the image there: where the window holds an image edge
the probability follows that edge at voxel precision; where the image is flat within the window (two touching
structures of one intensity, a brain parcel's border) the affine fit has no slope and the result is the window
mean of the probability: no boundary moves onto an edge that is not in the image, though it is smoothed (which
rounds a convex mask's corners and shrinks it slightly, by ~0.3 voxel for a 10-voxel ball under 2-voxel windows).

Measured on the train split (docs/evaluation.md, "Edge refinement"): +0.03 to +0.08 Dice on phantoms at clicks
1-5, level on the brain structures and lesions; the settings (2 mm, eps 1e-3, the plain filter) were chosen
there, never on the held-out split.

Arrays are [k, j, i] (numpy order of the volume); sizes in mm are turned into voxels per axis from the spacing
given in (i, j, k) order, as Geometry.spacing has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .paste import _interp_matrix
from .prompts import Region


@dataclass(frozen=True)
class EdgeRefineConfig:
    """radius_mm: half-width of the filter's windows (about one low-res voxel: the blur the refinement undoes).
    eps: regularisation in units of the intensity variance over the refined region: a window whose intensity
    spread is well below sqrt(eps) of the region's standard deviation counts as flat (the fit falls back to the
    window mean). Small values follow every edge the window holds (1e-3 measured best on the train phantoms,
    and level with no refinement on the brain structures, where parcels share one intensity).
    keep_flat: where the image is flat within a window, return the probabilities as they are (True) instead of
    their double window mean as the plain guided filter does (False, the default: measured better, see above)."""

    radius_mm: float = 2.0
    eps: float = 1e-3
    keep_flat: bool = False

    def __post_init__(self) -> None:
        if not self.radius_mm > 0:
            raise ValueError(f"radius_mm must be > 0, got {self.radius_mm}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    @classmethod
    def parse(cls, text: str) -> EdgeRefineConfig:
        """From 'RADIUS_MM,EPS[,keepflat]' (a command-line value; 'keepflat': keep_flat True); ValueError naming
        what is wrong."""
        parts = text.split(",")
        keep = len(parts) == 3 and parts[2].strip() == "keepflat"
        try:
            if len(parts) != 2 + keep:
                raise ValueError
            radius, eps = (float(x) for x in parts[:2])
        except ValueError:
            raise ValueError(f"want RADIUS_MM,EPS[,keepflat] (e.g. 2,0.001), got {text!r}") from None
        return cls(radius_mm=radius, eps=eps, keep_flat=keep)

    @property
    def label(self) -> str:
        """A short name for reports and file names, e.g. 'edge2mm-eps0.001'."""
        return f"edge{self.radius_mm:g}mm-eps{self.eps:g}" + ("-keepflat" if self.keep_flat else "")

    def radius_voxels(self, spacing_ijk) -> tuple[int, int, int]:
        """Window half-widths in voxels along (k, j, i): 0 along an axis whose spacing is more than twice the radius
        (5 mm slices under a 2 mm radius: a window of 3 slices would reach 15 mm, no filtering across slices)."""
        return tuple(int(round(self.radius_mm / float(s))) for s in reversed(tuple(spacing_ijk)))


DEFAULT_EDGE_REFINE = EdgeRefineConfig()  # what SessionOptions uses unless told otherwise


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Means of blocks of f voxels (an axis not a multiple of its factor is padded by repeating its last voxel)."""
    for axis, s in enumerate(f):
        if s == 1:
            continue
        if a.shape[axis] % s:
            extra = s - a.shape[axis] % s
            a = np.concatenate([a, np.repeat(np.take(a, [-1], axis=axis), extra, axis=axis)], axis=axis)
        part = [slice(None)] * 3
        part[axis] = slice(0, None, s)
        total = a[tuple(part)].copy()
        for t in range(1, s):
            part[axis] = slice(t, None, s)
            total += a[tuple(part)]
        a = total * np.float32(1.0 / s)
    return a


def _upsample(arrays: list[np.ndarray], f: tuple[int, int, int], shape) -> list[np.ndarray]:
    """Trilinear upsampling by f per axis of block-mean grids back to ``shape``: a block's value sits at its centre
    (align_corners=False, the border block repeated). One matrix product per axis with the interpolation weights
    the paste uses (paste._interp_matrix), ~2x faster than strided numpy writes."""
    t = torch.from_numpy(np.stack(arrays))
    for axis, s in enumerate(f):
        if s == 1:
            continue
        n_low = t.shape[axis + 1]
        w = _interp_matrix(np.arange(shape[axis], dtype=np.float64), n_low, n_low * s).T.contiguous()
        t = torch.movedim(torch.movedim(t, axis + 1, -1) @ w, -1, axis + 1)
    t = t[:, : shape[0], : shape[1], : shape[2]]
    return [np.ascontiguousarray(t[c].numpy()) for c in range(len(arrays))]


def guided_filter(
    guide: np.ndarray, p: np.ndarray, radius_kji: tuple[int, int, int], eps: float, keep_flat: bool = False
) -> np.ndarray:
    """Guided filter of ``p`` with ``guide`` (float32 [k, j, i] arrays of one shape) over boxes of half-widths
    ``radius_kji`` voxels; ``eps`` in units of the guide's variance over the whole array; ``keep_flat`` as in
    :class:`EdgeRefineConfig`. Returns float32.

    The window statistics are computed on a grid coarser by 2 along each axis whose half-width is 2 voxels or more
    and the affine coefficients upsampled back (He and Sun's fast guided filter): the coefficients vary on the
    window's scale, the guide itself still enters at full resolution, so edges stay as sharp, at ~1/4 of the cost.
    """
    g = guide.astype(np.float32, copy=False)
    p = p.astype(np.float32, copy=False)
    sample = g[:, ::2, ::2]  # a quarter of the voxels: as good a mean and spread, at a quarter of the cost
    spread = float(sample.std())
    if spread == 0.0 or not np.isfinite(spread):
        return p.copy()  # nothing to follow
    g = (g - np.float32(sample.mean())) * np.float32(1.0 / spread)
    f = tuple(min(r, 3) if r >= 2 else 1 for r in radius_kji)
    size = tuple(2 * (max(1, round(r / s)) if r else 0) + 1 for r, s in zip(radius_kji, f))

    def box(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=size, mode="nearest")

    g_low, p_low = _block_mean(g, f), _block_mean(p, f)
    mean_g, mean_p = box(g_low), box(p_low)
    var_g = box(_block_mean(g * g, f)) - mean_g * mean_g
    cov = box(_block_mean(g * p, f)) - mean_g * mean_p
    a = cov / (var_g + np.float32(eps))
    b = mean_p - a * mean_g
    if not keep_flat:
        big_a, big_b = _upsample([box(a), box(b)], f, p.shape)
        return big_a * g + big_b
    # In flat windows a ~ 0 and the plain filter returns box(box(p)), which shrinks a convex mask by its curvature
    # (a 10-voxel sphere loses ~1 voxel of radius under 7-voxel windows); adding back what the double box takes
    # from p leaves p itself there.
    big_a, offset = _upsample([box(a), box(b) - box(mean_p)], f, p.shape)
    return big_a * g + offset + p


def grown_region(region: Region, radius_kji: tuple[int, int, int], size_ijk) -> Region:
    """``region`` widened by the filter's reach (its half-widths, twice: the windows of the windows), clipped to the
    volume of ``size_ijk`` voxels; the refined mask can only change within it."""
    reach = [2 * r for r in reversed(radius_kji)]  # (i, j, k)
    lo = tuple(max(0, a - d) for a, d in zip(region.lo, reach))
    hi = tuple(min(int(n), a + d) for a, d, n in zip(region.hi, reach, size_ijk))
    return Region(lo, hi)


def refine(logits: np.ndarray, image: np.ndarray, spacing_ijk, config: EdgeRefineConfig) -> np.ndarray:
    """The refined mask (bool [k, j, i]) of upsampled ``logits`` over a region of the volume, given the volume's
    intensities ``image`` over the same region (any real dtype) and its spacing in mm along (i, j, k)."""
    p = torch.sigmoid(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy()
    q = guided_filter(image.astype(np.float32), p, config.radius_voxels(spacing_ijk), config.eps, config.keep_flat)
    return q > 0.5
