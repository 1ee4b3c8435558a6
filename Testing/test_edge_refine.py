"""The edge refinement (edge_refine.py): the guided filter puts a blurred, misplaced boundary onto the image's edge,
leaves a boundary alone where the image has none, and the session writes and undoes refined masks exactly."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from MemorizingSAMLib.edge_refine import EdgeRefineConfig, _block_mean, _upsample, guided_filter, refine
from MemorizingSAMLib.geometry import CropGrid, Geometry
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.paste import PasteScratch, Region, sample_logits, sample_region, sample_tiles
from MemorizingSAMLib.session import InteractiveSession, SessionOptions


def ball(shape, centre, radius) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def dice(a, b) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_a_mask_through_a_coarse_grid_snaps_back_onto_the_edges_of_a_bright_shape():
    """The loss the refinement undoes: the true mask averaged onto a 4x coarser grid and trilinearly upsampled (as
    the session does with the 32^3 logits) rounds off corners and thin parts; the image's edges bring them back."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices((48, 48, 48))
    truth = ball((48, 48, 48), (24, 24, 24), 8) | ball((48, 48, 48), (24, 18, 32), 5)
    truth |= (np.abs(k - 24) < 2) & (np.abs(j - 30) < 2) & (np.abs(i - 20) < 10)  # a thin rod
    image = np.where(truth, 300.0, 100.0) + rng.normal(0, 10, truth.shape)
    coarse = torch.nn.functional.avg_pool3d(torch.from_numpy(truth.astype(np.float32))[None, None], 4)
    up = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="trilinear", align_corners=False)[0, 0]
    p = up.numpy().clip(1e-4, 1 - 1e-4)
    logits = np.log(p / (1 - p))
    after = refine(logits, image, (1.0, 1.0, 1.0), EdgeRefineConfig())
    assert dice(logits > 0, truth) < 0.90
    assert dice(after, truth) > 0.97


def test_where_the_image_has_no_edge_the_boundary_moves_little():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (40, 40, 40))  # noise only: two structures of one intensity
    k, j, i = np.indices(image.shape)
    r = np.sqrt((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2)
    logits = (10.0 - r) / 1.5
    before = logits > 0
    # keep_flat: the probabilities stay as they are where nothing in the image explains them
    kept = refine(logits, image, (1.0, 1.0, 1.0), EdgeRefineConfig(keep_flat=True))
    assert dice(kept, before) > 0.99
    # the default plain filter smooths (a 10-voxel ball shrinks by under a voxel of radius) and never grows
    # onto noise; nothing moves by more than a voxel or two
    plain = refine(logits, image, (1.0, 1.0, 1.0), EdgeRefineConfig())
    assert dice(plain, before) > 0.85
    assert not (plain & ~ndimage.binary_dilation(before)).any()
    assert not (~plain & ndimage.binary_erosion(before, iterations=2)).any()


def test_a_flat_guide_leaves_the_probabilities_as_they_are():
    rng = np.random.default_rng(2)
    p = rng.random((12, 10, 8)).astype(np.float32)
    np.testing.assert_array_equal(guided_filter(np.full(p.shape, 5.0, np.float32), p, (1, 2, 1), 1e-3), p)
    # with keep_flat, a noisy but edgeless guide moves them little under a large eps (the plain filter returns
    # their double box mean there)
    noise = rng.normal(0, 1, p.shape).astype(np.float32)
    q = guided_filter(noise, p, (1, 2, 1), 16.0, keep_flat=True)
    assert np.abs(q - p).mean() < 0.05
    plain = guided_filter(noise, p, (1, 2, 1), 1e4)
    assert plain.std() < 0.3 * p.std() and abs(plain.mean() - p.mean()) < 0.02


def test_block_means_and_upsampling_agree_with_torch_pooling_and_trilinear_interpolation():
    rng = np.random.default_rng(4)
    for f in [(1, 2, 2), (2, 3, 3), (1, 3, 2)]:
        coarse = rng.random((7, 20, 21)).astype(np.float32)
        full = tuple(n * s for n, s in zip(coarse.shape, f))
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(coarse)[None, None], size=full, mode="trilinear", align_corners=False
        )[0, 0].numpy()
        shape = (full[0] - 1, full[1] - 2, full[2] - 1)  # regions rarely fill whole blocks
        np.testing.assert_allclose(_upsample([coarse], f, shape)[0], ref[: shape[0], : shape[1], : shape[2]], atol=1e-5)
        fine = rng.random(full).astype(np.float32)
        pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(fine)[None, None], f)[0, 0].numpy()
        np.testing.assert_allclose(_block_mean(fine, f), pooled, atol=1e-5)


def test_window_sizes_follow_the_spacing_per_axis():
    assert EdgeRefineConfig(radius_mm=3.0).radius_voxels((0.75, 1.5, 7.0)) == (0, 2, 4)  # (k, j, i)
    with pytest.raises(ValueError, match="eps"):
        EdgeRefineConfig(eps=0)


@pytest.mark.parametrize("oblique", [False, True])
def test_sampled_logits_have_the_sign_of_the_pasted_mask(oblique):
    torch.manual_seed(3)
    d = np.eye(3)
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        d = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    geom = Geometry((90, 70, 30), (0.7, 0.8, 2.5), (3.0, -7.0, 11.0), tuple(d.reshape(-1)))
    grid = CropGrid.centred_on(geom.ijk_to_ras(np.array([45.0, 35.0, 15.0])), 1.5, 64)
    low = torch.randn(1, 1, 32, 32, 32)
    region = Region((5, 4, 2), (80, 66, 28))
    sub, positive, inside = sample_region(low, geom, grid, region)
    sub2, logits, inside2 = sample_logits(low, geom, grid, region)
    assert sub == sub2 and logits.dtype == np.float32 and logits.shape == positive.shape
    ok = np.ones(positive.shape, bool) if inside is None else inside
    assert (inside is None) == (inside2 is None)
    agree = (logits > 0)[ok] == positive[ok]
    assert agree.mean() > 0.9999 and np.abs(logits[ok][~agree]).max(initial=0) < 1e-5


def test_a_shared_scratch_gives_the_plans_of_the_region_asked_for():
    # The plan cache is keyed by crop transform and region: interleaving regions and crops (as the paste and
    # the edge refinement do within one click) must never hand one region's interpolation weights to another.
    torch.manual_seed(4)
    geom = Geometry((90, 70, 30), (0.7, 0.8, 2.5), (3.0, -7.0, 11.0), tuple(np.eye(3).reshape(-1)))
    grids = [CropGrid.centred_on(geom.ijk_to_ras(np.array(c)), 1.5, 64) for c in ((45.0, 35, 15), (40.0, 30, 12))]
    regions = [Region((5, 4, 2), (80, 66, 28)), Region((20, 10, 5), (60, 50, 20)), Region((0, 0, 0), (90, 70, 30))]
    low = torch.randn(1, 1, 32, 32, 32)
    scratch = PasteScratch()
    scratch.max_plans = 2  # smaller than the number of distinct keys below, so entries are also evicted
    for _ in range(2):
        for grid in grids:
            for region in regions:
                sub, vals, _ = sample_logits(low, geom, grid, region, scratch)
                sub0, vals0, _ = sample_logits(low, geom, grid, region)
                assert sub == sub0 and np.array_equal(vals, vals0)
                # A tile's mask is scratch memory until the next tile: copied as they come.
                tiles = [(t.region, t.positive.copy()) for t in sample_tiles(low, geom, grid, region, scratch)]
                fresh = [(t.region, t.positive.copy()) for t in sample_tiles(low, geom, grid, region)]
                assert [r for r, _ in tiles] == [r for r, _ in fresh]
                assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(tiles, fresh))


def tiny_model_and_bright_box(seed: int) -> tuple[torch.nn.Module, np.ndarray]:
    """An untrained small model and a noisy [k, j, i] volume holding one bright box."""
    torch.manual_seed(0)
    model = build_sam3d("memsam_tiny_student").eval()
    vol = np.random.default_rng(seed).normal(100, 20, (40, 120, 110)).astype(np.float32)
    vol[10:30, 40:80, 30:70] += 300
    return model, vol


def test_edge_refinement_switched_on_after_the_image_was_set_works_as_from_the_start():
    model, vol = tiny_model_and_bright_box(1)
    masks = []
    for late in (False, True):
        s = InteractiveSession(model, SessionOptions(edge_refine=None if late else EdgeRefineConfig()))
        s.set_image(vol, spacing=(0.8, 0.8, 2.5))
        if late:
            s.options = SessionOptions(edge_refine=EdgeRefineConfig())
        seg = s.add_segment()
        s.add_point((50.0, 60.0, 20.0))
        masks.append(s.mask(seg).copy())
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def test_session_with_edge_refinement_writes_its_region_and_undoes_exactly():
    model, vol = tiny_model_and_bright_box(0)
    s = InteractiveSession(model, SessionOptions(edge_refine=EdgeRefineConfig()))
    s.set_image(vol, spacing=(0.8, 0.8, 2.5))
    seg = s.add_segment()
    region = s.add_point((50.0, 60.0, 20.0))
    mask = s.mask(seg)
    assert region is not None and mask[region.slices].any()
    outside = np.ones(mask.shape, bool)
    outside[region.slices] = False
    assert not mask[outside].any(), "nothing is written outside the returned region"
    first = mask.copy()
    s.add_point((45.0, 50.0, 18.0), include=False)
    s.undo(seg)
    assert np.array_equal(s.mask(seg), first)
    s.undo(seg)
    assert not s.mask(seg).any()


def test_the_command_line_form_parses_and_names_its_errors():
    c = EdgeRefineConfig.parse("2.5,9")
    assert (c.radius_mm, c.eps, c.keep_flat) == (2.5, 9.0, False)
    assert EdgeRefineConfig.parse("3,4,keepflat").keep_flat is True
    for bad in ("3", "3,x", "3,4,5", "-1,4"):
        with pytest.raises(ValueError, match="RADIUS_MM|radius_mm"):
            EdgeRefineConfig.parse(bad)


def test_refined_masks_depend_on_the_prompts_not_on_how_they_were_placed():
    """Deleting the first of several clicks replays the rest; the segment then holds the mask a fresh segment gets
    from the same prompts (the filter never sees the previous result's box, which depends on the history). The
    shipped model on the shipped lung crop, where the masks are real ones."""
    from pathlib import Path

    import SimpleITK as sitk

    from MemorizingSAMLib.checkpoints import load_model
    from MemorizingSAMLib.resources import default_model_path

    samples = Path(__file__).resolve().parent.parent / "Resources" / "SampleData"
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(samples / "lung2_crop_label.nii.gz"))) > 0
    k, j, i = np.argwhere(lesion).mean(0)
    s = InteractiveSession(load_model(default_model_path()).prepare_for_inference())
    assert s.options.edge_refine is not None  # the default
    s.set_image(str(samples / "lung2_crop.nii.gz"))
    a = s.add_segment()
    for di, dj, inc in [(0, 0, True), (-12, 4, False), (6, -6, True), (14, 2, False), (-4, 10, True)]:
        s.add_point((i + di, j + dj, k), include=inc, segment=a)
    kept = list(s.placed(a))[1:]
    s.set_prompts(kept, a)
    b = s.add_segment()
    s.set_prompts(kept, b)
    assert s.mask(a).sum() > 300 and np.array_equal(s.mask(a), s.mask(b))
