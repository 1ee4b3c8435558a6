"""Geometry through real files: a sphere phantom written as NIfTI/NRRD in LPS, RAS, oblique, anisotropic and
smaller-than-crop grids. A click at the sphere centre lands at the sphere centre in model space, and a model-space
mask of the sphere mapped back agrees with the true sphere in the original grid."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MemorizingSAMLib.geometry import CropGrid, Geometry, ImageError, read_image, resample_to_crop
from MemorizingSAMLib.paste import PasteScratch, Region, positive_region, sample_region, sample_tiles

RADIUS_MM = 15.0
CENTRE_LPS = np.array([12.0, -30.0, 41.0])


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


CASES = {
    "lps_identity": dict(size=(90, 80, 70), spacing=(0.8, 0.8, 1.0), direction=np.eye(3)),
    "ras_flipped": dict(size=(90, 80, 70), spacing=(0.8, 0.8, 1.0), direction=np.diag([-1.0, -1.0, 1.0])),
    "oblique_30deg": dict(size=(80, 80, 60), spacing=(0.9, 0.9, 1.1), direction=rotation(30, 30)),
    "anisotropic_0.5x0.5x5": dict(size=(160, 150, 12), spacing=(0.5, 0.5, 5.0), direction=np.eye(3)),
    "smaller_than_crop": dict(size=(30, 28, 26), spacing=(1.5, 1.5, 1.5), direction=np.eye(3)),
    "permuted_axes": dict(
        size=(70, 60, 80), spacing=(1.0, 0.7, 0.9), direction=np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0.0]])
    ),
}


def sphere_image(size, spacing, direction) -> sitk.Image:
    """Bright sphere of RADIUS_MM around CENTRE_LPS, the grid centred on it."""
    d = np.asarray(direction, dtype=np.float64)
    sp = np.asarray(spacing)
    half = (np.asarray(size) - 1) / 2
    origin = CENTRE_LPS - d @ (sp * half) + d @ (sp * np.array([0.3, -0.2, 0.1]))  # centre off the voxel grid
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in d.reshape(-1)])
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(np.float64)
    lps = ijk @ (d * sp).T + origin
    dist = np.linalg.norm(lps - CENTRE_LPS, axis=-1)
    arr = (np.clip(RADIUS_MM + 0.5 - dist, 0, 1) * 900 + 100).astype(np.float32)  # partial-volume edge
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


@pytest.fixture(params=[(name, ext) for name in CASES for ext in (".nii.gz", ".nrrd")], ids=lambda p: f"{p[0]}{p[1]}")
def written(request, tmp_path):
    name, ext = request.param
    img = sphere_image(**CASES[name])
    path = tmp_path / f"{name}{ext}"
    sitk.WriteImage(img, str(path))
    return path


def test_click_at_centre_lands_at_centre_and_mask_maps_back(written):
    img = read_image(written)
    geom = Geometry.from_sitk(img)
    centre_ijk = np.asarray(img.TransformPhysicalPointToContinuousIndex([float(v) for v in CENTRE_LPS]))
    ras = geom.ijk_to_ras(centre_ijk)
    np.testing.assert_allclose(ras, CENTRE_LPS * [-1, -1, 1], atol=1e-6)
    grid = CropGrid.centred_on(ras, 1.5, 128)
    xyz = grid.ras_to_crop(ras)
    assert np.all(np.abs(xyz - 64) < 0.5)

    # The sphere as the model sees it: its intensity centroid in the resampled crop is at the click.
    crop = resample_to_crop(img, grid)
    w = np.clip(crop - 100, 0, None)
    idx = np.indices(crop.shape).reshape(3, -1).T
    centroid = (idx * w.reshape(-1, 1)).sum(0) / w.sum()
    assert np.all(np.abs(centroid - xyz) < 0.5), centroid

    # A model-space mask of the sphere (signed distance at the 32^3 low-res grid) mapped back to the original grid.
    lr = 32
    c = (np.arange(lr) + 0.5) * 4 - 0.5  # crop coordinate of each low-res voxel centre
    gx, gy, gz = np.meshgrid(c, c, c, indexing="ij")
    dist = np.sqrt((gx - xyz[0]) ** 2 + (gy - xyz[1]) ** 2 + (gz - xyz[2]) ** 2) * 1.5
    low = torch.from_numpy((RADIUS_MM - dist).astype(np.float32))[None, None]
    region = positive_region(low, geom, grid)
    sub, positive, inside = sample_region(low, geom, grid, region)
    mask = np.zeros(geom.size[::-1], dtype=bool)
    mask[sub.slices] = positive if inside is None else positive & inside
    k, j, i = np.meshgrid(*[np.arange(n) for n in geom.size[::-1]], indexing="ij")
    lps = np.stack([i, j, k], -1) @ (geom.direction * np.asarray(geom.spacing)).T + np.asarray(geom.origin_lps)
    truth = np.linalg.norm(lps - CENTRE_LPS, axis=-1) <= RADIUS_MM
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.95, dice


def test_ras_lps_roundtrip_and_slicer_ijk_to_ras():
    g = Geometry((10, 20, 30), (0.5, 0.7, 2.0), (5.0, -3.0, 7.0), tuple(rotation(30, 10).reshape(-1)))
    ijk = np.array([[1.5, 2.0, 3.25], [9, 19, 29]])
    np.testing.assert_allclose(g.ras_to_ijk(g.ijk_to_ras(ijk)), ijk, atol=1e-10)
    img = g.to_sitk_reference()
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint([1.5, 2.0, 3.25]))
    np.testing.assert_allclose(g.ijk_to_ras(ijk[0]), lps * [-1, -1, 1], atol=1e-10)


@pytest.mark.parametrize("tile_voxels", [1 << 19, 5000, 37])
def test_tiled_separable_paste_equals_trilinear_sampling(tile_voxels):
    """The axis-aligned tiled path (whole planes per tile, runs of rows, single rows) gives grid_sample's trilinear
    interpolation at every voxel centre, tiles cover the region once, and voxels outside the crop are left out."""
    torch.manual_seed(1)
    geom = Geometry((330, 64, 50), (0.63, 0.7, 5.0), (3.0, -7.0, 11.0), tuple(np.diag([1.0, -1.0, 1.0]).reshape(-1)))
    grid = CropGrid.centred_on(geom.ijk_to_ras(np.array([150.0, 30.0, 20.0])), 1.5, 128)
    low = torch.randn(1, 1, 32, 32, 32)  # a noisy mask: about half the intervals change sign
    region = Region((0, 0, 0), geom.size)
    got = np.zeros(geom.size[::-1], dtype=np.int32)
    for tile in sample_tiles(low, geom, grid, region, PasteScratch(tile_voxels)):
        assert tile.inside is None
        got[tile.region.slices] += 1 + tile.positive  # 1: sampled, 2: sampled and positive
    # reference: every voxel centre through grid_sample (align_corners=False, border clamp)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geom.size[::-1]], indexing="ij")
    xyz = grid.ras_to_crop(geom.ijk_to_ras(np.stack([i, j, k], -1)))
    inside = np.all((xyz >= -0.5) & (xyz <= grid.size - 0.5), axis=-1)
    u = torch.from_numpy(((xyz[..., ::-1] + 0.5) * (2.0 / grid.size) - 1.0).astype(np.float32))
    vals = torch.nn.functional.grid_sample(
        low, u.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=False
    ).reshape(inside.shape)
    assert inside.sum() > 0 and (~inside).sum() > 0  # the crop cuts the volume
    assert np.array_equal(got > 0, inside)
    agree = (got[inside] == 2) == (vals.numpy()[inside] > 0)
    # identical up to float rounding of the interpolation weights: only voxels with |logit| ~ 1e-6 may differ
    assert agree.mean() > 0.9999
    assert np.abs(vals.numpy()[inside][~agree]).max(initial=0) < 1e-5


@pytest.mark.parametrize("oblique", [False, True])
def test_positive_region_bounds_every_positive_voxel(oblique):
    """The region from the low-res positives holds every volume voxel whose trilinear logit is positive, and is the
    box of the crop-space bound's eight corners mapped into the volume (nothing looser)."""
    rng = np.random.default_rng(4)
    direction = rotation(30, 10) if oblique else np.diag([-1.0, 1.0, 1.0])
    geom = Geometry((90, 80, 40), (0.9, 0.8, 3.0), (-20.0, 15.0, -40.0), tuple(direction.reshape(-1)))
    grid = CropGrid.centred_on(geom.ijk_to_ras(np.array([45.0, 40.0, 20.0])), 1.5, 128)
    for trial in range(3):
        low = torch.full((1, 1, 32, 32, 32), -1.0)
        for x, y, z in rng.integers(10, 22, size=(trial + 1, 3)):
            low[0, 0, x, y, z] = 2.0
        region = positive_region(low, geom, grid)
        # reference: the corners of the crop-space bound [f l0 - f/2 - .5, f l1 + 3f/2 - .5] mapped into ijk
        pos = np.argwhere(low[0, 0].numpy() > 0)
        lo_c = np.maximum(4.0 * pos.min(0) - 2.5, -0.5)
        hi_c = np.minimum(4.0 * pos.max(0) + 5.5, 127.5)
        corners = np.array(
            [
                [a, b, c]
                for a in lo_c[[0]].tolist() + hi_c[[0]].tolist()
                for b in (lo_c[1], hi_c[1])
                for c in (lo_c[2], hi_c[2])
            ]
        )
        ijk = geom.ras_to_ijk(grid.crop_to_ras(corners))
        size = np.asarray(geom.size)
        lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, size)
        hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, size)
        assert region == Region(tuple(int(v) for v in lo), tuple(int(v) for v in hi))
        # every positive voxel of the whole volume (grid_sample) lies in the region
        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geom.size[::-1]], indexing="ij")
        xyz = grid.ras_to_crop(geom.ijk_to_ras(np.stack([i, j, k], -1)))
        u = torch.from_numpy(((xyz[..., ::-1] + 0.5) * (2.0 / grid.size) - 1.0).astype(np.float32))
        vals = torch.nn.functional.grid_sample(
            low, u.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=False
        ).reshape(xyz.shape[:3])
        inside = np.all((xyz >= -0.5) & (xyz <= grid.size - 0.5), axis=-1)
        kk, jj, ii = np.nonzero((vals.numpy() > 0) & inside)
        assert kk.size > 0
        assert region.lo[0] <= ii.min() and ii.max() < region.hi[0]
        assert region.lo[1] <= jj.min() and jj.max() < region.hi[1]
        assert region.lo[2] <= kk.min() and kk.max() < region.hi[2]
    assert positive_region(torch.full((1, 1, 32, 32, 32), -1.0), geom, grid) is None


def test_damaged_gzip_images_are_refused(tmp_path):
    """SimpleITK reads a truncated or damaged .nii.gz without a word; read_image checks the stream to its end."""
    arr = np.random.default_rng(0).integers(0, 1000, (20, 40, 50)).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=True)
    data = path.read_bytes()
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), arr)
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    bad = bytearray(data)
    bad[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in bad[len(data) // 2 : len(data) // 2 + 64])
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(bad))
    for name in ("cut.nii.gz", "flipped.nii.gz"):
        with pytest.raises(ImageError, match="damaged gzip"):
            read_image(tmp_path / name)


def test_files_silently_wrong_in_simpleitk_are_refused(tmp_path):
    """NaN / inf NIfTI voxels (ITK reads them as 0), a header declaring 1000^3 voxels in a few hundred bytes (ITK
    allocates first), a NaN origin and a sheared direction (det 1, not orthonormal) are refused with the reason."""
    import gzip

    from MemorizingSAMLib.geometry import validate_image

    arr = np.random.default_rng(1).random((10, 20, 30)).astype(np.float32)
    arr[3, 4, 5], arr[1, 1, 1] = np.nan, np.inf
    for ext in (".nii", ".nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"nan{ext}"))
        with pytest.raises(ImageError, match="2 NaN or infinite voxels"):
            read_image(tmp_path / f"nan{ext}")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16)), str(tmp_path / "small.nii"))
    head = bytearray((tmp_path / "small.nii").read_bytes())
    head[42:48] = np.array([1000, 1000, 1000], "<i2").tobytes()  # dim[1..3]
    (tmp_path / "huge.nii").write_bytes(bytes(head))
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(head)))
    for name in ("huge.nii", "huge.nii.gz"):
        assert (tmp_path / name).stat().st_size < 1000
        with pytest.raises(ImageError, match=r"declares \(1000, 1000, 1000\) voxels"):
            read_image(tmp_path / name)
    img = sitk.GetImageFromArray(np.arange(6000, dtype=np.int16).reshape(10, 20, 30))
    img.SetOrigin((float("nan"), 0.0, 0.0))
    with pytest.raises(ImageError, match="invalid origin"):
        validate_image(img)
    img.SetOrigin((0.0, 0.0, 0.0))
    img.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ImageError, match="not orthonormal"):
        validate_image(img)
