"""Classic interactive baselines with the same interface as the model: SimpleITK region growing, and
scikit-image's random walker (RandomWalkerSegmenter, below).

Region growing:

The first include click sets an intensity window, mean +- ``multiplier`` std of its 5x5x5 neighbourhood (the
statistics ConfidenceConnected starts from; later clicks do not widen it, since a click on a boundary would make
it leak). Each exclude click narrows the window on its side to half-way between the window's centre and the
clicked intensity, and carves a small sphere; the result is ConnectedThreshold grown from every include click
(plus a 2 mm sphere at each, so a click is never ignored), keeping only what is connected to an include click.
Holes are filled. It runs on a region of interest around the first click, so it stays fast on big volumes.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


class RegionGrowingSegmenter:
    name = "sitk_region_growing"

    def __init__(self, roi_mm: float = 128.0, multiplier: float = 2.5, carve_mm: float = 3.0):
        self.roi_mm, self.multiplier, self.carve_mm = roi_mm, multiplier, carve_mm
        self.image: sitk.Image | None = None
        self.last_latency_ms = 0.0

    def set_image(self, image: sitk.Image) -> None:
        self.image = sitk.Cast(image, sitk.sitkFloat32)
        self.array = sitk.GetArrayViewFromImage(self.image)
        self.spacing = np.array(image.GetSpacing())
        self.size = np.array(image.GetSize())
        self.mask = np.zeros(self.size[::-1], np.uint8)

    def new_target(self) -> None:
        self.clicks: list[tuple[tuple[int, int, int], bool]] = []
        self.mask = np.zeros(self.size[::-1], np.uint8)

    def _neighbourhood_stats(self, ijk, r: int) -> tuple[float, float]:
        i, j, k = ijk
        patch = self.array[max(0, k - r) : k + r + 1, max(0, j - r) : j + r + 1, max(0, i - r) : i + r + 1]
        return float(patch.mean()), float(patch.std())

    def click(self, ijk, include: bool) -> np.ndarray:
        t0 = time.perf_counter()
        self.clicks.append((tuple(int(v) for v in ijk), bool(include)))
        pos = [c for c, inc in self.clicks if inc]
        neg = [c for c, inc in self.clicks if not inc]
        self.mask[:] = 0
        if pos:
            mean, std = self._neighbourhood_stats(pos[0], 2)
            std = max(std, 1e-3 * (abs(mean) + 1))
            lower, upper = mean - self.multiplier * std, mean + self.multiplier * std
            for c in neg:
                v, _ = self._neighbourhood_stats(c, 1)
                if v >= mean:
                    upper = min(upper, (mean + v) / 2)
                else:
                    lower = max(lower, (mean + v) / 2)
            half = np.ceil(self.roi_mm / 2 / self.spacing).astype(int)
            lo = np.clip(np.array(pos[0]) - half, 0, self.size - 1)
            hi = np.clip(np.array(pos[0]) + half + 1, 1, self.size)
            inside = [c for c in pos if np.all(np.array(c) >= lo) and np.all(np.array(c) < hi)]
            roi = sitk.RegionOfInterest(self.image, [int(v) for v in hi - lo], [int(v) for v in lo])
            seeds = [[int(v) for v in np.array(c) - lo] for c in inside]
            grown = sitk.ConnectedThreshold(roi, seedList=seeds, lower=lower, upper=upper, replaceValue=1)
            m = sitk.GetArrayFromImage(grown).astype(bool)
            kk, jj, ii = np.ogrid[: m.shape[0], : m.shape[1], : m.shape[2]]

            def sphere(c, r_mm):
                ci, cj, ck = np.array(c) - lo
                return (
                    ((ii - ci) * self.spacing[0]) ** 2
                    + ((jj - cj) * self.spacing[1]) ** 2
                    + ((kk - ck) * self.spacing[2]) ** 2
                ) <= r_mm**2

            for c in inside:
                m |= sphere(c, 2.0)
            for c in neg:
                m &= ~sphere(c, self.carve_mm)
            lab, _ = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
            keep = {int(lab[s[2], s[1], s[0]]) for s in seeds} - {0}
            m = ndimage.binary_fill_holes(np.isin(lab, list(keep)))  # noise speckles are not holes in organs
            self.mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = m
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return self.mask


class RandomWalkerSegmenter:
    """A second classic baseline: scikit-image's random walker (Grady 2006) on a region around the first include
    click. Include clicks are foreground seeds, exclude clicks and the region's border background seeds (a 1-voxel
    ball each); the region is taken at a coarser grid when large (at most ``max_side`` voxels a side, spacing kept
    near-isotropic), solved there, and brought back by nearest neighbour. Same interface as the model's segmenter.
    """

    name = "skimage_random_walker"

    def __init__(self, roi_mm: float = 80.0, max_side: int = 64, beta: float = 130.0):
        self.roi_mm, self.max_side, self.beta = roi_mm, max_side, beta
        self.last_latency_ms = 0.0

    def set_image(self, image: sitk.Image) -> None:
        self.array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
        self.spacing = np.array(image.GetSpacing())  # (i, j, k) mm
        self.size = np.array(image.GetSize())
        self.mask = np.zeros(self.size[::-1], np.uint8)

    def new_target(self) -> None:
        self.clicks: list[tuple[tuple[int, int, int], bool]] = []
        self.mask = np.zeros(self.size[::-1], np.uint8)

    def click(self, ijk, include: bool) -> np.ndarray:
        from skimage.segmentation import random_walker

        t0 = time.perf_counter()
        self.clicks.append((tuple(int(v) for v in ijk), bool(include)))
        pos = [c for c, inc in self.clicks if inc]
        self.mask[:] = 0
        if pos:
            half = np.ceil(self.roi_mm / 2 / self.spacing).astype(int)
            lo = np.clip(np.array(pos[0]) - half, 0, self.size - 1)
            hi = np.clip(np.array(pos[0]) + half + 1, 1, self.size)
            # A coarser grid (integer steps per axis) keeps the linear solve to ~64^3 unknowns.
            step = np.maximum(1, np.ceil((hi - lo) / self.max_side)).astype(int)
            roi = self.array[lo[2] : hi[2] : step[2], lo[1] : hi[1] : step[1], lo[0] : hi[0] : step[0]]
            seeds = np.zeros(roi.shape, np.uint8)
            seeds[[0, -1], :, :] = seeds[:, [0, -1], :] = seeds[:, :, [0, -1]] = 2
            for c, inc in self.clicks:
                g = (np.array(c) - lo) // step
                if np.all(g >= 0) and np.all(g < roi.shape[::-1]):
                    i, j, k = g
                    seeds[max(0, k - 1) : k + 2, max(0, j - 1) : j + 2, max(0, i - 1) : i + 2] = 1 if inc else 2
            data = (roi - roi.mean()) / (roi.std() + 1e-6)
            # scikit-image's defaults (beta 130, unit grid spacing); its physical-spacing option made the 5 mm
            # slices of a CT nearly uncoupled and the mask collapse onto the seeds.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "probability range outside [0, 1]" at cg tolerance
                labels = random_walker(data, seeds, beta=self.beta, mode="cg_j", tol=1e-3)
            fg = labels == 1
            full = np.repeat(np.repeat(np.repeat(fg, step[2], 0), step[1], 1), step[0], 2)
            shape = tuple(hi[::-1] - lo[::-1])
            self.mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = full[: shape[0], : shape[1], : shape[2]]
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return self.mask
