"""Synthetic 3D phantoms with labels, reproducible from a seed: for tests, training and evaluation.

Each phantom holds 2-4 structures drawn from: ellipsoids, tubes (a curved cylinder), multi-lobed blobs (unions of
overlapping spheres) and touching pairs (two ellipsoids sharing a face), in a CT-like (Hounsfield-ish, air
background, soft-tissue body) or MR-like (arbitrary units, bias field) body, with Gaussian noise and anisotropic
spacing.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SHAPES = ("ellipsoid", "tube", "lobed", "touching")


def _grid(shape, spacing):
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing[::-1])], indexing="ij")
    return np.stack([i, j, k], -1)  # mm, (i, j, k) components, [k, j, i] layout


def _ellipsoid(p, centre, radii):
    return (((p - centre) / radii) ** 2).sum(-1) <= 1


def make_phantom(seed: int, shape_kji=(48, 96, 96)) -> tuple[sitk.Image, sitk.Image, dict[int, str]]:
    """(image, label map, {label value: name}) for ``seed``. Size ~96x96x48 voxels, spacing drawn per seed."""
    rng = np.random.default_rng(seed)
    spacing = (float(rng.uniform(0.7, 1.2)), float(rng.uniform(0.7, 1.2)), float(rng.choice([1.0, 2.0, 3.0])))
    shape = tuple(int(n) for n in shape_kji)
    if spacing[2] > 1.5:
        shape = (max(16, int(shape[0] * 1.5 / spacing[2] * 1.3)),) + shape[1:]
    p = _grid(shape, spacing)
    extent = np.array([shape[2] * spacing[0], shape[1] * spacing[1], shape[0] * spacing[2]])
    ct = bool(rng.integers(2))
    body = _ellipsoid(p, extent / 2, extent * np.array([0.46, 0.42, 0.6]))
    label = np.zeros(shape, np.uint8)
    names = {}
    n_struct = int(rng.integers(2, 5))
    kinds = rng.choice(SHAPES, size=n_struct)
    for idx, kind in enumerate(kinds, start=1):
        c = extent * rng.uniform(0.3, 0.7, 3)
        r = rng.uniform(6, 14, 3)
        if kind == "ellipsoid":
            m = _ellipsoid(p, c, r)
        elif kind == "tube":
            t = np.linspace(-1, 1, 40)[:, None]
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            bend = rng.normal(size=3) * 6
            pts = c + t * axis * 25 + (t**2) * bend
            m = np.zeros(shape, bool)
            rad = rng.uniform(3, 5)
            for q in pts:
                m |= ((p - q) ** 2).sum(-1) <= rad**2
        elif kind == "lobed":
            m = np.zeros(shape, bool)
            for _ in range(int(rng.integers(2, 4))):
                m |= _ellipsoid(p, c + rng.normal(size=3) * 7, np.full(3, rng.uniform(5, 9)))
        else:  # touching: two ellipsoids sharing a face, the second gets its own label
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            m = _ellipsoid(p, c, r) & (((p - c) @ d) < 0)
        m &= body
        m &= label == 0
        if m.sum() < 30:
            continue
        label[m] = idx
        names[idx] = f"{kind}_{idx}"
        if kind == "touching":
            m2 = _ellipsoid(p, c, r) & (((p - c) @ d) >= 0) & body & (label == 0)
            if m2.sum() >= 30:
                label[m2] = 10 + idx
                names[10 + idx] = f"touching_partner_{idx}"
    if ct:
        img = np.where(body, 40.0, -1000.0)
        for v in names:
            img[label == v] = rng.uniform(-100, 250)
        img += rng.normal(0, 15, shape)
    else:
        img = np.where(body, 300.0, 0.0)
        for v in names:
            img[label == v] = rng.uniform(50, 900)
        bias = ndimage.gaussian_filter(rng.normal(0, 1, (4, 4, 4)), 1)
        bias = ndimage.zoom(bias, np.array(shape) / 4, order=1)[: shape[0], : shape[1], : shape[2]]
        img = img * (1 + 0.15 * bias / (np.abs(bias).max() + 1e-9)) + rng.normal(0, 20, shape)
        img = np.clip(img, 0, None)
    image = sitk.GetImageFromArray(img.astype(np.int16 if ct else np.float32))
    labels = sitk.GetImageFromArray(label)
    # One origin for both: the label must lie on the image's grid (sessions up to 14 drew it twice, so the labels'
    # z origin differed from the images' and training resampled phantom targets up to 100 mm away from them).
    origin = (-extent[0] / 2, -extent[1] / 2, float(rng.uniform(-50, 50)))
    for x in (image, labels):
        x.SetSpacing(spacing)
        x.SetOrigin(origin)
    return image, labels, names
