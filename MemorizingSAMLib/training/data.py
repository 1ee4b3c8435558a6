"""Training samples from a prepared dataset: augmented model-space crops centred on a point inside a target.

A sample is what the session would see after a first click inside the structure: the crop centred on that click,
resampled (linear for the image, nearest for the label) at the model's spacing, normalised like at inference.
Augmentation: random rotation (up to ``max_rotation_deg`` about a random axis), scaling (+-``max_scale``),
axis flips, intensity scale/shift and Gaussian noise; the click point is a random voxel inside the target with
probability ``p_random_click``, else its interior-most voxel; with ``click_offset`` the crop centre is moved off
the click by a random whole number of crop voxels per axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..datasets import check_label_grid, load_dataset, targets
from ..evaluation.clicks import first_click
from ..geometry import LPS_TO_RAS, normalize_crop
from ..modeling.config import Sam3DConfig


@dataclass(frozen=True)
class AugmentConfig:
    max_rotation_deg: float = 15.0
    max_scale: float = 0.1
    flip: bool = True
    intensity: float = 0.1
    noise: float = 0.05
    p_random_click: float = 0.7
    # Crop centre up to this many crop voxels (per axis) away from click 1, for a share ``p_click_offset`` of the
    # samples. 0: click 1 always at the centre, which teaches the model to segment what lies at the crop centre
    # and to overlook later clicks away from it (measured in session 11: a single click 24 mm off the centre was
    # not in its own mask).
    click_offset: int = 0
    p_click_offset: float = 0.5


@dataclass
class Target:
    case: str
    source: str
    value: int
    name: str
    voxels_kji: np.ndarray  # indices of the target's voxels, (n, 3) [k, j, i]
    interior_kji: tuple[int, int, int]


class TrainingData:
    """The train split of a dataset held in memory, sampled uniformly over sources, then over targets."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        sources: tuple[str, ...] | None = None,
        min_voxels: int = 30,
        max_targets_per_case: int | None = None,
    ) -> None:
        root = Path(root)
        meta = load_dataset(root)
        self.images: dict[str, sitk.Image] = {}
        self.labels: dict[str, sitk.Image] = {}
        self.targets: dict[str, list[Target]] = {}
        for case in meta["cases"]:
            if sources and case["source"] not in sources:
                continue
            tg = targets(case, split)[:max_targets_per_case]
            if not tg:
                continue
            img = sitk.Cast(sitk.ReadImage(str(root / case["image"])), sitk.sitkFloat32)
            lab_img = sitk.ReadImage(str(root / case["label"]))
            check_label_grid(img, lab_img, case["id"])
            lab = sitk.GetArrayViewFromImage(lab_img)
            self.images[case["id"]] = img
            self.labels[case["id"]] = sitk.Cast(lab_img, sitk.sitkUInt8)
            for value, name in tg:
                m = lab == value
                n = int(m.sum())
                if n < min_voxels:
                    continue
                i, j, k = first_click(m, img.GetSpacing()).ijk
                interior = (k, j, i)
                self.targets.setdefault(case["source"], []).append(
                    Target(case["id"], case["source"], value, name, np.argwhere(m).astype(np.int32), interior)
                )
        if not self.targets:
            raise ValueError(f"{root}: no '{split}' targets with at least {min_voxels} voxels")

    def __len__(self) -> int:
        return sum(len(v) for v in self.targets.values())

    def sample(self, rng: np.random.Generator, cfg: Sam3DConfig, aug: AugmentConfig = AugmentConfig()):
        """(image crop float32 [x, y, z] normalised, label crop float32 {0,1} [x, y, z], click xyz in crop voxels)."""
        return self.crop(self.sample_target(rng), rng, cfg, aug)

    def sample_target(self, rng: np.random.Generator) -> Target:
        """A source uniformly, then one of its targets uniformly."""
        sources = sorted(self.targets)
        t = self.targets[sources[rng.integers(len(sources))]]
        return t[rng.integers(len(t))]

    def crop(self, tgt: Target, rng: np.random.Generator, cfg: Sam3DConfig, aug: AugmentConfig = AugmentConfig()):
        """The augmented training crop of ``tgt``: see :meth:`sample`."""
        return self.crop_from(self.images[tgt.case], self.labels[tgt.case], tgt, rng, cfg, aug)

    @staticmethod
    def crop_from(
        img: sitk.Image,
        lab: sitk.Image,
        tgt: Target,
        rng: np.random.Generator,
        cfg: Sam3DConfig,
        aug: AugmentConfig = AugmentConfig(),
    ):
        """The augmented crop of ``tgt`` (voxels ``lab == tgt.value``) from ``img`` (float32) and ``lab`` (uint8)
        on the same grid."""
        if rng.random() < aug.p_random_click:
            kji = tgt.voxels_kji[rng.integers(len(tgt.voxels_kji))]
        else:
            kji = np.array(tgt.interior_kji)
        centre_lps = np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]]))
        size, spacing = cfg.encoder.img_size, cfg.spacing_mm
        # crop axes x, y, z = R, A, S in LPS terms, then a random rotation / scale / flips around the click
        axes = LPS_TO_RAS.copy()
        if aug.max_rotation_deg > 0:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            a = np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            axes = (np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k) @ axes
        if aug.flip:
            axes = axes * rng.choice([-1.0, 1.0], size=3)[None, :]
        sp = spacing * (1 + rng.uniform(-aug.max_scale, aug.max_scale))
        ref = sitk.Image([size] * 3, sitk.sitkFloat32)
        ref.SetSpacing([sp] * 3)
        ref.SetDirection([float(v) for v in axes.reshape(-1)])
        half = size // 2
        click = np.full(3, half)  # the click's crop voxel (x, y, z)
        if aug.click_offset and rng.random() < aug.p_click_offset:
            reach = min(aug.click_offset, half - 1)
            click = click - rng.integers(-reach, reach + 1, size=3)
        # physical = origin + axes @ (index * sp): the click's voxel index lands on the click
        ref.SetOrigin([float(v) for v in centre_lps - axes @ (click * sp)])
        x = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
        y = sitk.GetArrayFromImage(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        y = (y.transpose(2, 1, 0) == tgt.value).astype(np.float32)
        x = normalize_crop(np.ascontiguousarray(x), cfg.normalization)
        if aug.intensity:
            x = x * np.float32(1 + rng.uniform(-aug.intensity, aug.intensity)) + np.float32(
                rng.uniform(-aug.intensity, aug.intensity)
            )
        if aug.noise:
            x = x + rng.normal(0, aug.noise, x.shape).astype(np.float32)
        y[tuple(click)] = 1.0  # the click voxel belongs to the target (nearest resampling may miss it)
        return x.astype(np.float32), y, click.astype(np.float32)
