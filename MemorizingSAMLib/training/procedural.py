"""Training volumes that never run out: generated on the fly, each reproducible from its seed (domain
randomisation, as SynthSeg does for brain MRI).

A case is drawn in physical space (mm), then sampled on a voxel grid of random, possibly anisotropic spacing and an
oblique direction, so shapes keep their size whatever the grid:

- shapes: ellipsoids, lobulated and spiculated blobs (a radius modulated by smooth noise over directions, plus
  spikes), tubes and branching trees (thickened random polylines), thin sheets and shells, nested and touching
  objects, objects with holes, objects cut by the volume's border;
- appearance: an intensity and a texture per structure and for the background, a smooth bias field, Gaussian or
  Rician noise, blur (which also gives partial volume), CT-like values (-1000 to 2000) or MR-like ranges;
- anatomy in unseen contrasts: :func:`synthesise_from_labels` paints a real label map with a random intensity per
  label after a random smooth deformation;
- targets of any size (:func:`targets`): whole structures, parts (a structure cut by a plane), unions of touching
  neighbours.

Arrays are [k, j, i]; points and sizes are (i, j, k) in mm; images are SimpleITK (LPS), labels uint8 (0 background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SHAPES = ("ellipsoid", "lobulated", "spiculated", "tube", "tree", "sheet", "shell", "nested", "touching", "holed")


@dataclass(frozen=True)
class ProceduralConfig:
    """Ranges the generator draws from. ``size_mm``: the volume's extent along each axis; ``spacings``: voxel
    spacings (i, j, k) in mm to choose from (anisotropic ones included); ``structures``: how many per case."""

    size_mm: tuple[float, float] = (90.0, 150.0)
    spacings: tuple[tuple[float, float, float], ...] = (
        (1.0, 1.0, 1.0),
        (1.5, 1.5, 1.5),
        (0.7, 0.7, 2.5),
        (0.6, 0.6, 5.0),
        (0.8, 0.8, 3.0),
    )
    structures: tuple[int, int] = (2, 6)
    radius_mm: tuple[float, float] = (4.0, 25.0)
    max_voxels: int = 2_000_000
    p_ct: float = 0.5
    p_oblique: float = 0.5


@dataclass
class Case:
    image: sitk.Image
    label: np.ndarray  # uint8 [k, j, i], 0 background, 1..n structures
    names: dict[int, str]  # label value -> shape kind


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _smooth_field(rng: np.random.Generator, shape, sigma_vox, amplitude=1.0) -> np.ndarray:
    """Zero-mean smooth noise of unit std times ``amplitude``, varying over ~``sigma_vox`` voxels per axis: white
    noise on a grid ``sigma_vox`` times coarser, interpolated up (cubic), which costs a fraction of filtering at
    full size."""
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    coarse = tuple(int(max(2, np.ceil(n / max(s, 1.0)) + 1)) for n, s in zip(shape, sigma))
    f = ndimage.zoom(rng.normal(size=coarse).astype(np.float32), [n / c for n, c in zip(shape, coarse)], order=3)
    f = f[tuple(slice(0, n) for n in shape)]
    f -= f.mean()
    return (f / (f.std() + 1e-8) * amplitude).astype(np.float32)


def _direction_noise(rng: np.random.Generator, d: np.ndarray, terms: int, amplitude: float) -> np.ndarray:
    """A smooth function of the unit directions ``d`` (..., 3): a sum of random low-order harmonics."""
    out = np.zeros(d.shape[:-1], np.float32)
    for _ in range(terms):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        freq = rng.integers(1, 4)
        out += np.cos(freq * np.pi * (d @ axis) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return amplitude * out / np.sqrt(terms)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _polyline(rng, start, length, steps, turn) -> list[np.ndarray]:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    pts = [np.asarray(start, float)]
    for _ in range(steps):
        direction = direction + rng.normal(size=3) * turn
        direction /= np.linalg.norm(direction)
        pts.append(pts[-1] + direction * length / steps)
    return pts


def _shape(kind: str, p: np.ndarray, c: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one shape of kind ``kind`` centred at ``c`` (mm) with size ``r`` (mm) on points ``p``."""
    rot = _rotation(rng)
    q = (p - c) @ rot  # the shape's own axes
    radii = r * rng.uniform(0.5, 1.0, 3)
    ell = ((q / radii) ** 2).sum(-1)
    if kind == "ellipsoid":
        return ell <= 1
    if kind in ("lobulated", "spiculated"):
        dist = np.linalg.norm(q / radii, axis=-1)
        d = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-9)
        m = dist <= 1 + _direction_noise(rng, d, 6, 0.25)
        if kind == "spiculated":
            for _ in range(int(rng.integers(4, 10))):
                tip = rng.normal(size=3)
                tip = tip / np.linalg.norm(tip) * r * rng.uniform(1.3, 2.0)
                m |= _segment_distance(q, np.zeros(3), tip) <= r * rng.uniform(0.05, 0.12)
        return m
    if kind in ("tube", "tree"):
        pts = _polyline(rng, c - rng.normal(size=3) * r, 4 * r, 8, 0.4)
        segs = list(zip(pts[:-1], pts[1:]))
        if kind == "tree":
            for _ in range(int(rng.integers(2, 5))):
                base = pts[int(rng.integers(1, len(pts) - 1))]
                branch = _polyline(rng, base, 2 * r, 5, 0.5)
                segs += list(zip(branch[:-1], branch[1:]))
        thick = r * rng.uniform(0.12, 0.3)
        m = np.zeros(p.shape[:-1], bool)
        for a, b in segs:
            m |= _segment_distance(p, a, b) <= thick * rng.uniform(0.7, 1.0)
        return m
    if kind == "sheet":
        return (np.abs(q[..., 2]) <= max(1.0, 0.08 * r)) & (ell <= 4)
    if kind == "shell":
        return np.abs(np.sqrt(ell) - 1) <= rng.uniform(0.08, 0.2)
    if kind == "holed":
        hole = (((q - rng.uniform(-0.3, 0.3, 3) * radii) / (radii * rng.uniform(0.25, 0.5))) ** 2).sum(-1) <= 1
        return (ell <= 1) & ~hole
    raise ValueError(f"unknown shape {kind!r}")


def sample_case(seed: int, cfg: ProceduralConfig = ProceduralConfig()) -> Case:
    """One random case; the same seed gives the same case."""
    rng = np.random.default_rng(seed)
    spacing = np.array(cfg.spacings[int(rng.integers(len(cfg.spacings)))], dtype=float)
    extent = rng.uniform(*cfg.size_mm, 3)
    shape_ijk = np.maximum(8, np.round(extent / spacing)).astype(int)
    while np.prod(shape_ijk) > cfg.max_voxels:
        shape_ijk = np.maximum(8, (shape_ijk * 0.9).astype(int))
    extent = shape_ijk * spacing
    direction = _rotation(rng) if rng.random() < cfg.p_oblique else np.eye(3)
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape_ijk[::-1], spacing[::-1])], indexing="ij")
    p = np.stack([i, j, k], -1).astype(np.float32)  # mm in the grid's own axes (the direction rotates the grid)
    label = np.zeros(tuple(shape_ijk[::-1]), np.uint8)
    names: dict[int, str] = {}
    value = 0
    for _ in range(int(rng.integers(cfg.structures[0], cfg.structures[1] + 1))):
        kind = str(rng.choice(SHAPES))
        r = float(rng.uniform(*cfg.radius_mm))
        # Centres anywhere in the volume, sometimes on its border (structures cut by the crop).
        c = extent * (rng.uniform(-0.05, 1.05, 3) if rng.random() < 0.2 else rng.uniform(0.2, 0.8, 3))
        # Shapes are evaluated only in a box around them (trees and tubes reach furthest).
        reach = r * (6.0 if kind in ("tube", "tree") else 2.6)
        lo = np.clip(np.floor((c - reach) / spacing), 0, shape_ijk).astype(int)
        hi = np.clip(np.ceil((c + reach) / spacing) + 1, 0, shape_ijk).astype(int)
        if np.any(hi <= lo):
            continue
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        pb = p[box]
        if kind == "nested":
            outer = _shape("ellipsoid", pb, c, r, rng)
            inner = _shape(str(rng.choice(("ellipsoid", "lobulated"))), pb, c, r * 0.5, rng) & outer
            parts = [("nested_outer", outer & ~inner), ("nested_inner", inner)]
        elif kind == "touching":
            a = _shape("ellipsoid", pb, c, r, rng)
            offset = rng.normal(size=3)
            b = _shape("ellipsoid", pb, c + offset / np.linalg.norm(offset) * r * 0.9, r * 0.8, rng) & ~a
            parts = [("touching_a", a), ("touching_b", b)]
        else:
            parts = [(kind, _shape(kind, pb, c, r, rng))]
        view = label[box]
        for name, m in parts:
            m &= view == 0  # later structures do not overwrite earlier ones
            if m.sum() < 8 or value == 255:
                continue
            value += 1
            view[m] = value
            names[value] = name
    image = _appearance(label, spacing, rng, ct=rng.random() < cfg.p_ct)
    img = sitk.GetImageFromArray(image)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.reshape(-1)])
    img.SetOrigin([float(v) for v in rng.uniform(-200, 200, 3)])
    return Case(img, label, names)


def _appearance(label: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, ct: bool) -> np.ndarray:
    """float32 [k, j, i] intensities for a label map: per-label mean and texture, bias, blur, noise."""
    sigma_texture = 4.0 / spacing[::-1]  # ~4 mm texture
    if ct:
        lo, hi = -1000.0, 2000.0
        background = float(rng.choice([-1000.0, -800.0, rng.uniform(-100, 100)]))
        means = rng.uniform(-900, 1500, int(label.max()) + 1)
        noise_sd = rng.uniform(5, 60)
    else:
        lo, hi = 0.0, float(rng.uniform(300, 4000))
        background = float(rng.uniform(0, 0.3) * hi)
        means = rng.uniform(0.05, 0.95, int(label.max()) + 1) * hi
        noise_sd = rng.uniform(0.005, 0.05) * hi
    means[0] = background
    image = means[label].astype(np.float32)
    texture = _smooth_field(rng, label.shape, sigma_texture)
    amplitudes = rng.uniform(0, 0.15, len(means)) * (hi - lo) * 0.1
    image += texture * amplitudes[label].astype(np.float32)
    if not ct:  # MR: a smooth multiplicative bias field
        image *= np.exp(_smooth_field(rng, label.shape, 40.0 / spacing[::-1], rng.uniform(0, 0.3)))
    blur = rng.uniform(0, 1.2) / spacing[::-1]
    if blur.max() > 0.2:
        image = ndimage.gaussian_filter(image, blur)
    if ct or rng.random() < 0.5:
        image += rng.normal(0, noise_sd, label.shape).astype(np.float32)
    else:  # Rician magnitude noise, as in MR
        image = np.hypot(image + rng.normal(0, noise_sd, label.shape), rng.normal(0, noise_sd, label.shape))
    return np.clip(image, lo - 3 * noise_sd, hi + 3 * noise_sd).astype(np.float32)


def synthesise_from_labels(
    label: np.ndarray, spacing, seed: int, deform_mm: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """An image in an unseen contrast for a real label map ([k, j, i], spacing (i, j, k) mm): the labels moved by
    a random smooth deformation (up to ~``deform_mm``), then painted with a random intensity per label (CT- or
    MR-like) as in :func:`sample_case`. Returns (image, deformed label), both [k, j, i]."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, dtype=float)[::-1]
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in label.shape], indexing="ij")
    coords = [g + _smooth_field(rng, label.shape, 12.0 / sp, deform_mm / s) for g, s in zip(grid, sp)]
    moved = ndimage.map_coordinates(label, coords, order=0, mode="nearest").astype(np.uint8)
    values = np.unique(moved)
    remap = np.zeros(int(label.max()) + 1, np.uint8)
    remap[values] = np.arange(len(values), dtype=np.uint8)  # dense 0..n for the painter
    image = _appearance(remap[moved], np.asarray(spacing, float), rng, ct=rng.random() < 0.5)
    return image, moved


def targets(case: Case, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Training targets of a case: each whole structure, a part of one (cut by a random plane through it), and
    the union of two touching neighbours when there are any. (name, boolean [k, j, i] mask)."""
    out = [(f"{case.names[v]}_{v}", case.label == v) for v in case.names]
    if case.names:
        v = int(rng.choice(list(case.names)))
        m = case.label == v
        idx = np.argwhere(m)
        centre = idx.mean(0)
        normal = rng.normal(size=3)
        part = m.copy()
        part[tuple(idx[((idx - centre) @ normal) < 0].T)] = False
        if part.sum() >= 8:
            out.append((f"part_of_{v}", part))
    for v in case.names:
        grown = ndimage.binary_dilation(case.label == v)
        touching = set(np.unique(case.label[grown])) - {0, v}
        if touching:
            w = min(touching)
            out.append((f"union_{v}_{w}", (case.label == v) | (case.label == w)))
            break
    return out
