"""Small islands of a mask, away from every include click, dropped: the specks a mask head leaves on strong edges
elsewhere in the crop (a rib's cortex beside a lung lesion), which a clinician would otherwise erase by hand.

A 26-connected component is kept when it holds an include click's voxel, or when it has at least ``min_fraction``
of the voxels of the largest component (a second part of the target that the model found on its own).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FULL = np.ones((3, 3, 3), bool)


def drop_islands(mask: np.ndarray, keep_kji: np.ndarray, min_fraction: float) -> np.ndarray:
    """``mask`` (bool, KJI) without its small components that hold none of ``keep_kji``.

    keep_kji: (N, 3) integer voxel indices (k, j, i) in ``mask``'s own grid; rows outside it are ignored.
    min_fraction: a component with at least this share of the largest component's voxels stays regardless.
    Returns a new bool array (``mask`` itself when nothing is dropped).
    """
    # intp labels: np.bincount would otherwise copy an int32 array to intp first (~10 ms on 3M voxels).
    labels = np.empty(mask.shape, np.intp)
    n = ndimage.label(mask, structure=_FULL, output=labels)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()
    pts = np.asarray(keep_kji, dtype=np.int64).reshape(-1, 3)
    inside = np.all((pts >= 0) & (pts < np.array(mask.shape)), axis=1)
    for k, j, i in pts[inside]:
        keep[labels[k, j, i]] = True
    keep[0] = False
    if keep[1:].all():
        return mask
    return keep[labels]
