"""Image geometry: voxel indices, physical coordinates, model-space crops, resampling in and out.

Conventions (the source of most bugs in this field, so stated once and used everywhere):
- A volume's voxel index is (i, j, k), SimpleITK's order: i runs fastest in memory. Its numpy array is indexed
  [k, j, i] ("KJI"). Continuous indices are allowed; voxel centres are integers.
- Physical points are millimetres. SimpleITK (and DICOM, NRRD "left-posterior-superior") use LPS; Slicer uses RAS.
  RAS = (-L, -P, S) of LPS, i.e. the first two coordinates flip sign.
- ``direction`` is SimpleITK's 3x3 matrix whose columns are the LPS unit vectors of the i, j, k axes:
  LPS = origin + direction @ (spacing * ijk).
- Model space (the published checkpoints): a cube of ``size`` voxels (128) at ``spacing`` mm (1.5), axis-aligned
  in RAS, tensor axes (x, y, z) = (R, A, S), so crop voxel (x, y, z) lies at RAS = origin_ras + spacing * (x, y, z).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image_checks import FileCheckError, TooManyVoxels, check_image_file

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


class ImageTooLarge(ImageError):
    """An image with more voxels than a limit allows (told before its voxels are decoded)."""


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D volume: size (I, J, K), spacing (mm along i, j, k), LPS origin and direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: tuple[float, ...]  # row-major 3x3

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> Geometry:
        return cls(
            tuple(int(s) for s in img.GetSize()),
            tuple(float(s) for s in img.GetSpacing()),
            tuple(float(s) for s in img.GetOrigin()),
            tuple(float(s) for s in img.GetDirection()),
        )

    @property
    def direction(self) -> np.ndarray:
        return np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)

    @cached_property
    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 affine: LPS = M @ (i, j, k, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin_lps
        return m

    @cached_property
    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 affine: RAS = M @ (i, j, k, 1) (what Slicer calls IJKToRAS)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps_matrix

    def ijk_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """(..., 3) continuous indices -> (..., 3) RAS mm."""
        m = self.ijk_to_ras_matrix
        return np.asarray(ijk, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    @cached_property
    def ras_to_ijk_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras_matrix)

    def ras_to_ijk(self, ras: np.ndarray) -> np.ndarray:
        m = self.ras_to_ijk_matrix
        return np.asarray(ras, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def contains_ijk(self, ijk: np.ndarray) -> bool:
        """Inside the image's extent: each continuous index within [-0.5, size - 0.5]."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(self.size) - 0.5))

    def to_sitk_reference(self) -> sitk.Image:
        """An image with this geometry (uint8 zeros), e.g. as a resampling reference or a labelmap template."""
        img = sitk.Image(list(self.size), sitk.sitkUInt8)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin_lps)
        img.SetDirection(self.direction_lps)
        return img


@dataclass(frozen=True)
class CropGrid:
    """A model-space crop: ``size``^3 voxels of ``spacing`` mm, RAS-aligned, voxel (0,0,0) centred at ``origin_ras``."""

    origin_ras: tuple[float, float, float]
    spacing: float
    size: int

    @classmethod
    def centred_on(cls, ras: np.ndarray, spacing: float, size: int) -> CropGrid:
        """The crop whose voxel (size/2, size/2, size/2) lies exactly at ``ras`` (a first click lands on a voxel
        centre, at integer coordinates, as the published click generators pass them)."""
        ras = np.asarray(ras, dtype=np.float64)
        origin = ras - spacing * (size // 2)
        # Round to a micrometre so that equal crops compare and hash equal (the embedding cache key).
        return cls(tuple(float(v) for v in np.round(origin, 3)), float(spacing), int(size))

    def ras_to_crop(self, ras: np.ndarray) -> np.ndarray:
        """(..., 3) RAS mm -> continuous crop coordinates (x, y, z), voxel centres at integers."""
        return (np.asarray(ras, dtype=np.float64) - np.asarray(self.origin_ras)) / self.spacing

    def crop_to_ras(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64) * self.spacing + np.asarray(self.origin_ras)

    def contains(self, xyz: np.ndarray, margin: float = 0.0) -> bool:
        """Inside the crop, ``margin`` voxels away from its faces (continuous extent [-0.5, size - 0.5])."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return bool(np.all(xyz >= -0.5 + margin) and np.all(xyz <= self.size - 0.5 - margin))

    def to_sitk_reference(self) -> sitk.Image:
        """Empty float image with this grid, in SimpleITK's LPS terms: the x, y, z axes point R, A, S, i.e.
        direction diag(-1, -1, 1) in LPS; its array [k, j, i] is the crop indexed [z, y, x]."""
        ref = sitk.Image([self.size] * 3, sitk.sitkFloat32)
        ref.SetSpacing([self.spacing] * 3)
        ref.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.asarray(self.origin_ras)))
        ref.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        return ref


def ijk_to_crop_affine(geom: Geometry, grid: CropGrid) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with crop_xyz = A @ ijk + b for the volume's continuous indices."""
    m = geom.ijk_to_ras_matrix
    a = m[:3, :3] / grid.spacing
    b = (m[:3, 3] - np.asarray(grid.origin_ras)) / grid.spacing
    return a, b


def resample_to_crop(image: sitk.Image, grid: CropGrid, pad_value: float = 0.0) -> np.ndarray:
    """Linear resampling of ``image`` into ``grid``: float32 array indexed [x, y, z] (tensor axes R, A, S).

    Outside the image the crop takes ``pad_value`` (raw intensity, before normalisation; upstream pads with 0).
    """
    out = sitk.Resample(
        image, grid.to_sitk_reference(), sitk.Transform(), sitk.sitkLinear, float(pad_value), sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def normalize_crop(crop: np.ndarray, mode: str = "zscore_positive") -> np.ndarray:
    """Intensity normalisation of a crop, in place where possible; returns float32.

    ``zscore_positive`` is SAM-Med3D's: mean and unbiased std over voxels > 0, applied to every voxel. A crop with
    no positive voxel uses all voxels; a constant crop gets std 1 (so it becomes zeros, not NaN).
    """
    crop = crop.astype(np.float32, copy=False)
    if mode == "none":
        return crop
    if mode != "zscore_positive":
        raise ValueError(f"unknown normalisation {mode!r}")
    fg = crop[crop > 0]
    if fg.size < 2:
        fg = crop.reshape(-1)
    mu = float(fg.mean(dtype=np.float64))
    sd = float(fg.std(dtype=np.float64, ddof=1)) if fg.size > 1 else 0.0
    if not np.isfinite(sd) or sd < 1e-8:
        sd = 1.0
    crop -= np.float32(mu)
    crop /= np.float32(sd)
    return crop


def check_file(path: str | os.PathLike, max_voxels: int | None = None) -> None:
    """What SimpleITK lets through silently, refused before it reads the file (image_checks.py): damaged gzip
    streams, NIfTI headers declaring more voxels than the file holds (or than ``max_voxels``), NaN / inf NIfTI
    voxels. Raises ImageError (ImageTooLarge for ``max_voxels``)."""
    try:
        check_image_file(path, max_voxels)
    except TooManyVoxels as e:
        raise ImageTooLarge(str(e)) from None
    except FileCheckError as e:
        raise ImageError(f"{path}: {e}") from None


def read_image(source: str | os.PathLike) -> sitk.Image:
    """Read a 3D image with SimpleITK: any file it reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder."""
    p = Path(source)
    if p.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(p))
        if not series:
            raise ImageError(f"{p}: a folder without a DICOM series")
        if len(series) > 1:
            raise ImageError(f"{p}: {len(series)} DICOM series in one folder; point at a folder with one series")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), series[0]))
        return reader.Execute()
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    check_file(p)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise ImageError(f"{p}: SimpleITK cannot read it ({first})") from None


def image_from_array(
    array_kji: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction_lps: tuple[float, ...] | np.ndarray = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    """A SimpleITK image from a [k, j, i] array (one copy) with spacing (i, j, k) mm and LPS origin/direction."""
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise ImageError(f"expected a 3D array indexed [k, j, i], got {arr.ndim}D of shape {arr.shape}")
    img = sitk.GetImageFromArray(arr)
    try:
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetOrigin(tuple(float(s) for s in origin_lps))
        img.SetDirection(tuple(float(s) for s in np.asarray(direction_lps, dtype=np.float64).reshape(-1)))
    except (RuntimeError, TypeError, ValueError) as e:  # ITK refuses a singular direction, a wrong length ...
        d = np.asarray(direction_lps, dtype=np.float64).reshape(-1).tolist()
        raise ImageError(
            f"invalid geometry (spacing {tuple(spacing)}, origin {tuple(origin_lps)}, direction {d}): the direction "
            f"matrix is not orthonormal or a value is missing ({str(e).strip().splitlines()[-1]})"
        ) from None
    return img


def validate_image(img: sitk.Image) -> None:
    """Refuse images the session cannot segment: not 3D, multi-component, empty, non-finite or constant."""
    if img.GetDimension() != 3:
        raise ImageError(f"expected a 3D image, got {img.GetDimension()}D of size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if min(img.GetSize()) == 0:
        raise ImageError(f"the image is empty (size {img.GetSize()})")
    if any(s <= 0 or not np.isfinite(s) for s in img.GetSpacing()):
        raise ImageError(f"invalid voxel spacing {img.GetSpacing()}")
    if not all(np.isfinite(v) for v in img.GetOrigin()):
        raise ImageError(f"invalid origin {tuple(float(v) for v in img.GetOrigin())}")
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        # (a sheared matrix can have determinant 1; NIfTI writers would replace it silently)
        raise ImageError(f"the direction matrix {np.round(d, 4).tolist()} is not orthonormal (sheared or singular)")
    view = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(view.dtype, np.floating):
        # Slab by slab, so a 1024^3 volume needs no whole-volume temporary.
        bad = sum(int(np.count_nonzero(~np.isfinite(view[k : k + 16]))) for k in range(0, view.shape[0], 16))
        if bad:
            raise ImageError(f"the image has {bad} NaN or infinite voxels")
    mm = sitk.MinimumMaximumImageFilter()
    mm.Execute(img)
    if mm.GetMinimum() == mm.GetMaximum():
        raise ImageError(f"the image is constant (every voxel is {mm.GetMinimum():g}): nothing to segment")
