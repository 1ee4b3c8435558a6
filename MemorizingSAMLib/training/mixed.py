"""Training samples from three kinds of cases, mixed: procedural volumes (procedural.py), the real training label
maps painted in random contrasts, and the real training images with augmentation (data.py).

Generated cases live in two small pools (``MixConfig.pool_size`` each). A new case enters a pool every
``refresh_every`` training steps, replacing the oldest, so the stream never repeats and only a few cases are in
memory. Which cases are in a pool is a function of the step (``set_step``, called by the training loop), and every
case a function of the seed, the rank and its index, so a resumed run sees exactly the cases it would have seen
and needs no sampler state, and each rank of a torchrun job draws its own cases.

Held-out data never enters: the real part is :class:`TrainingData` of the train split, and the synthetic images
are painted from label maps in which every structure that is not a train target of that case is erased to
background first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..evaluation.clicks import first_click
from ..modeling.config import Sam3DConfig
from . import procedural
from .data import AugmentConfig, Target, TrainingData


@dataclass(frozen=True)
class MixConfig:
    """Shares of the three kinds (the real share is what remains), pool sizes and the generator's ranges."""

    p_procedural: float = 0.4
    p_synthetic: float = 0.2
    pool_size: int = 6
    refresh_every: int = 6  # training steps
    seed: int = 0
    min_voxels: int = 30
    # Synthetic cases are painted from a cube of this edge (mm) around a real train target.
    synthetic_region_mm: float = 130.0
    procedural_config: procedural.ProceduralConfig = field(default_factory=procedural.ProceduralConfig)

    def __post_init__(self) -> None:
        if not (0 <= self.p_procedural and 0 <= self.p_synthetic and self.p_procedural + self.p_synthetic <= 1):
            raise ValueError(f"shares must be >= 0 with a sum <= 1, got {self.p_procedural}, {self.p_synthetic}")
        if self.pool_size < 1 or self.refresh_every < 1:
            raise ValueError("pool_size and refresh_every must be >= 1")


@dataclass
class _PoolCase:
    images: dict[str, sitk.Image]
    labels: dict[str, sitk.Image]
    targets: list[Target]


class _Pool:
    """Cases ``make(index)`` for index = step // refresh_every - pool_size + 1 .. step // refresh_every."""

    def __init__(self, make, size: int, refresh_every: int) -> None:
        self.make, self.size, self.refresh_every = make, size, refresh_every
        self.step = 0
        self.cases: OrderedDict[int, _PoolCase] = OrderedDict()

    def live(self) -> list[int]:
        newest = self.step // self.refresh_every
        return list(range(max(0, newest - self.size + 1), newest + 1))

    def draw(self, rng: np.random.Generator) -> tuple[_PoolCase, Target]:
        live = self.live()
        for index in [i for i in self.cases if i not in live]:
            del self.cases[index]
        # A case without targets (everything too small) is skipped, deterministically.
        candidates = [i for i in live if self._get(i).targets]
        if not candidates:
            raise RuntimeError("no generated case in the pool has a target")
        case = self.cases[candidates[int(rng.integers(len(candidates)))]]
        return case, case.targets[int(rng.integers(len(case.targets)))]

    def _get(self, index: int) -> _PoolCase:
        if index not in self.cases:
            self.cases[index] = self.make(index)
        return self.cases[index]


def _pool_case(prefix: str, image: sitk.Image, masks: list[tuple[str, np.ndarray]], min_voxels: int) -> _PoolCase:
    """One generated case: a binary label image per target (parts and unions overlap the structures)."""
    images, labels, tg = {}, {}, []
    for n, (name, m) in enumerate(masks):
        if int(m.sum()) < min_voxels:
            continue
        key = f"{prefix}/{n}"
        lab = sitk.GetImageFromArray(m.astype(np.uint8))
        lab.CopyInformation(image)
        images[key], labels[key] = image, lab
        i, j, k = first_click(m, image.GetSpacing()).ijk
        tg.append(Target(key, prefix.split(":")[0], 1, name, np.argwhere(m).astype(np.int32), (k, j, i)))
    return _PoolCase(images, labels, tg)


class MixedTrainingData:
    """Same interface as :class:`TrainingData` for the training loops (``sample_target``, ``crop``, ``sample``),
    plus ``set_step``. ``real`` may be None (generated cases only)."""

    def __init__(self, real: TrainingData | None, cfg: MixConfig | None = None, rank: int = 0) -> None:
        self.cfg = cfg or MixConfig()
        self.real = real
        # Per-rank streams: rank r's case i is seeded from (seed, r, i), so ranks see different cases.
        self._base = (self.cfg.seed, rank)
        self.procedural = _Pool(self._make_procedural, self.cfg.pool_size, self.cfg.refresh_every)
        self.synthetic = _Pool(self._make_synthetic, self.cfg.pool_size, self.cfg.refresh_every)
        self._current: dict[str, _PoolCase] = {}
        if real is None and self.cfg.p_procedural + self.cfg.p_synthetic < 1:
            raise ValueError("without real training data the procedural and synthetic shares must sum to 1")
        if real is None and self.cfg.p_synthetic > 0:
            raise ValueError("synthetic cases are painted from the real label maps: give real training data")

    def _seed(self, kind: int, index: int) -> int:
        return int(np.random.SeedSequence([*self._base, kind, index]).generate_state(1)[0])

    def _make_procedural(self, index: int) -> _PoolCase:
        seed = self._seed(1, index)
        case = procedural.sample_case(seed, self.cfg.procedural_config)
        masks = procedural.targets(case, np.random.default_rng(seed + 1))
        return _pool_case(f"procedural:{index}", case.image, masks, self.cfg.min_voxels)

    def _make_synthetic(self, index: int) -> _PoolCase:
        seed = self._seed(2, index)
        rng = np.random.default_rng(seed)
        tgt = self.real.sample_target(rng)
        lab_img = self.real.labels[tgt.case]
        keep = sorted({t.value for ts in self.real.targets.values() for t in ts if t.case == tgt.case})
        spacing = np.array(lab_img.GetSpacing())
        half = np.ceil(self.cfg.synthetic_region_mm / 2 / spacing).astype(int)  # (i, j, k) voxels
        centre = np.array(tgt.voxels_kji[rng.integers(len(tgt.voxels_kji))][::-1])
        size = np.array(lab_img.GetSize())
        lo, hi = np.maximum(0, centre - half), np.minimum(size, centre + half + 1)
        region = sitk.RegionOfInterest(lab_img, [int(v) for v in hi - lo], [int(v) for v in lo])
        lab = sitk.GetArrayFromImage(region)
        lab = np.where(np.isin(lab, keep), lab, 0).astype(np.uint8)  # held-out structures erased first
        image, moved = procedural.synthesise_from_labels(lab, spacing, seed)
        img = sitk.GetImageFromArray(image)
        img.CopyInformation(region)
        masks = [(f"{tgt.source}_{v}", moved == v) for v in np.unique(moved) if v]
        return _pool_case(f"synthetic:{index}", img, masks, self.cfg.min_voxels)

    def __len__(self) -> int:
        return len(self.real) if self.real is not None else 0

    def sample_target(self, rng: np.random.Generator) -> Target:
        u = rng.random()
        if u < self.cfg.p_procedural:
            case, tgt = self.procedural.draw(rng)
        elif u < self.cfg.p_procedural + self.cfg.p_synthetic:
            case, tgt = self.synthetic.draw(rng)
        else:
            return self.real.sample_target(rng)
        self._current[tgt.case] = case
        return tgt

    def crop(self, tgt: Target, rng: np.random.Generator, cfg: Sam3DConfig, aug: AugmentConfig = AugmentConfig()):  # noqa: B008 (frozen)
        """The augmented crop of ``tgt`` (see :meth:`TrainingData.sample`)."""
        if tgt.case in self._current:
            case = self._current.pop(tgt.case)
            return TrainingData.crop_from(case.images[tgt.case], case.labels[tgt.case], tgt, rng, cfg, aug)
        return self.real.crop(tgt, rng, cfg, aug)

    def sample(self, rng: np.random.Generator, cfg: Sam3DConfig, aug: AugmentConfig = AugmentConfig()):  # noqa: B008 (frozen)
        return self.crop(self.sample_target(rng), rng, cfg, aug)

    def set_step(self, step: int) -> None:
        """The training step about to be drawn for: it decides which generated cases are in the pools."""
        self.procedural.step = self.synthetic.step = int(step)
