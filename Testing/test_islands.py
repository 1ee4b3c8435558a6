"""Small islands away from the include clicks are dropped; the clicked part and large parts stay."""

import numpy as np
import pytest
from scipy import ndimage
from test_edge_refine import tiny_model_and_bright_box

from MemorizingSAMLib.edge_refine import EdgeRefineConfig
from MemorizingSAMLib.islands import drop_islands
from MemorizingSAMLib.session import InteractiveSession, SessionOptions


def blobs() -> np.ndarray:
    """A [k, j, i] mask: a 10^3 block, a 2^3 speck and a 5x5x4 second part (10 % of the block)."""
    m = np.zeros((20, 30, 40), bool)
    m[2:12, 2:12, 2:12] = True  # 1000 voxels
    m[15:17, 20:22, 30:32] = True  # 8
    m[14:18, 2:7, 25:30] = True  # 100
    return m


def test_a_speck_away_from_the_clicks_goes_and_large_parts_stay():
    m = blobs()
    out = drop_islands(m, np.array([[5, 5, 5]]), 0.05)
    assert out[5, 5, 5] and out[15, 4, 27], "the clicked block and the 10 % part stay"
    assert not out[15:17, 20:22, 30:32].any(), "the speck goes"
    assert out.sum() == 1100


def test_a_clicked_speck_stays_whatever_its_size():
    m = blobs()
    # k, j, i of a speck voxel: swapping the axes would point outside the speck and drop it.
    out = drop_islands(m, np.array([[5, 5, 5], [16, 21, 31]]), 0.5)
    assert out[15:17, 20:22, 30:32].all()
    assert not out[14:18, 2:7, 25:30].any(), "below half of the largest and not clicked: dropped"


def test_clicks_outside_the_grid_are_ignored_and_one_part_is_returned_as_is():
    m = blobs()
    out = drop_islands(m, np.array([[-1, 5, 5], [5, 5, 400]]), 0.05)
    assert out.sum() == 1100
    single = np.zeros((5, 5, 5), bool)
    single[1:3, 1:3, 1:3] = True
    assert drop_islands(single, np.zeros((0, 3)), 1.0) is single


def test_the_session_drops_unclicked_islands_of_its_refined_mask_and_keeps_a_clicked_one():
    model, vol = tiny_model_and_bright_box(0)
    clicks = [(50.0, 60.0, 20.0), (48.0, 6.0, 1.0)]  # (i, j, k)
    masks = []
    for option in (None, 1.0):
        s = InteractiveSession(model, SessionOptions(edge_refine=EdgeRefineConfig(), drop_islands=option))
        s.set_image(vol, spacing=(0.8, 0.8, 2.5))
        seg = s.add_segment()
        for c in clicks:
            s.add_point(c)
        masks.append(s.mask(seg).astype(bool))
    plain, filtered = masks
    labels, n = ndimage.label(plain, np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    assert n > 10, "the untrained model's mask has many parts (else this test shows nothing)"
    assert 0 < sizes[labels[1, 6, 48]] < sizes[1:].max() / 100, "the second click lies on a small part"
    # The islands never reach the model (it sees its own logits), so the filter is exactly the function.
    kji = np.array([[int(k), int(j), int(i)] for i, j, k in clicks])
    assert np.array_equal(filtered, drop_islands(plain, kji, 1.0))
    assert filtered[1, 6, 48] and ndimage.label(filtered, np.ones((3, 3, 3), bool))[1] <= 2


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="drop_islands"):
        SessionOptions(drop_islands=1.5)
