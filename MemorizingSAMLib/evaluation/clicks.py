"""Click simulation, deterministic.

Click 1 at the interior-most voxel of the target (maximum of its distance transform, in mm). Each next click at
the interior-most voxel of the largest connected error region (26-connectivity): positive (include) where the
model under-segments, negative where it over-segments. Ties go to the first voxel in C order of the [k, j, i]
array, and between equally large regions to the under-segmented one, then to the one found first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_CONN26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Click:
    ijk: tuple[int, int, int]  # voxel index (i, j, k)
    include: bool


def bbox_of(*masks: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice] | None:
    """[k, j, i] slices around the union of non-zero voxels of ``masks`` (plus ``margin``), or None if empty."""
    lo, hi = None, None
    for m in masks:
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            nz = np.flatnonzero(m.any(axis=other))
            if nz.size == 0:
                break
            lo_a, hi_a = nz[0], nz[-1] + 1
            if lo is None:
                lo, hi = [None] * 3, [None] * 3
            lo[axis] = lo_a if lo[axis] is None else min(lo[axis], lo_a)
            hi[axis] = hi_a if hi[axis] is None else max(hi[axis], hi_a)
    if lo is None or any(v is None for v in lo):
        return None
    shape = masks[0].shape
    return tuple(slice(max(0, lo[a] - margin), min(shape[a], hi[a] + margin)) for a in range(3))


def interior_voxel(mask: np.ndarray, spacing_kji=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """[k, j, i] index of the voxel farthest (in mm) from the mask's border; the image border counts as border."""
    dt = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dt)), dt.shape))


def first_click(gt: np.ndarray, spacing_ijk=(1.0, 1.0, 1.0)) -> Click:
    box = bbox_of(gt)
    if box is None:
        raise ValueError("the target is empty")
    k, j, i = interior_voxel(gt[box] > 0, spacing_ijk[::-1])
    return Click((int(i + box[2].start), int(j + box[1].start), int(k + box[0].start)), True)


def next_click(gt: np.ndarray, pred: np.ndarray, spacing_ijk=(1.0, 1.0, 1.0)) -> Click | None:
    """The correction a simulated user makes next, or None when the prediction is perfect."""
    box = bbox_of(gt, pred)
    if box is None:
        return None
    g, p = gt[box] > 0, pred[box] > 0
    best = None  # (size, include, component mask)
    for include, err in ((True, g & ~p), (False, p & ~g)):
        if not err.any():
            continue
        lab, n = ndimage.label(err, structure=_CONN26)
        sizes = np.bincount(lab.ravel())[1:]
        c = int(np.argmax(sizes)) + 1
        if best is None or sizes[c - 1] > best[0]:
            best = (int(sizes[c - 1]), include, lab == c)
    if best is None:
        return None
    k, j, i = interior_voxel(best[2], spacing_ijk[::-1])
    return Click((int(i + box[2].start), int(j + box[1].start), int(k + box[0].start)), bool(best[1]))
