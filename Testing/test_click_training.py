"""Training for clicks away from the crop centre: off-centre first clicks (data.py) and the loss at the clicks
(loop.py)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from MemorizingSAMLib.modeling.config import get_config
from MemorizingSAMLib.training.data import AugmentConfig, Target, TrainingData
from MemorizingSAMLib.training.loop import click_consistency_loss

STILL = AugmentConfig(max_rotation_deg=0, max_scale=0, flip=False, intensity=0, noise=0, p_random_click=0)


@pytest.fixture(scope="module")
def case():
    """An anisotropic image with an asymmetric L-shaped target and its interior click (k, j, i)."""
    lab = np.zeros((40, 50, 60), np.uint8)
    lab[10:30, 12:36, 15:30] = 1
    lab[10:18, 12:20, 30:50] = 1  # the foot of the L, along i only
    img = sitk.GetImageFromArray((lab * 50.0 + 10).astype(np.float32))
    img.SetSpacing((1.2, 1.0, 1.5))
    img.SetOrigin((-20.0, 5.0, 30.0))
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(img)
    tgt = Target("a", "test", 1, "L", np.argwhere(lab == 1).astype(np.int32), (20, 24, 22))
    return img, label, tgt


def test_off_centre_crop_moves_the_content_with_the_click(case):
    img, label, tgt = case
    cfg = get_config("memsam_hq_teacher")
    half = cfg.encoder.img_size // 2
    _, y0, c0 = TrainingData.crop_from(img, label, tgt, np.random.default_rng(0), cfg, STILL)
    assert tuple(c0) == (half, half, half)
    aug = AugmentConfig(**{**STILL.__dict__, "click_offset": 12, "p_click_offset": 1.0})
    clicks = []
    for seed in range(6):
        _, y, c = TrainingData.crop_from(img, label, tgt, np.random.default_rng(seed), cfg, aug)
        c = c.astype(int)
        clicks.append(tuple(c))
        assert np.all(np.abs(c - half) <= 12)
        assert y[tuple(c)] == 1
        # The crop's content is the centred crop's, moved by the click's shift (whole crop voxels, same points).
        d = c - half
        src = tuple(slice(max(0, -s), y0.shape[a] - max(0, s)) for a, s in enumerate(d))
        dst = tuple(slice(max(0, s), y.shape[a] - max(0, -s)) for a, s in enumerate(d))
        assert np.array_equal(y[dst], y0[src])
        assert y.sum() > 0
    assert len(set(clicks)) > 3, "the offsets do not vary"


def test_offset_share_zero_keeps_the_click_at_the_centre(case):
    img, label, tgt = case
    cfg = get_config("memsam_hq_teacher")
    aug = AugmentConfig(**{**STILL.__dict__, "click_offset": 12, "p_click_offset": 0.0})
    for seed in range(3):
        _, _, c = TrainingData.crop_from(img, label, tgt, np.random.default_rng(seed), cfg, aug)
        assert tuple(c) == (cfg.encoder.img_size // 2,) * 3


def test_click_loss_reads_the_upsampled_logits_at_the_clicks():
    torch.manual_seed(0)
    low = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    pts = torch.tensor([[[3.0, 40.0, 17.0], [60.0, 2.0, 33.0], [0.0, 63.0, 31.0]]])
    lab = torch.tensor([[1, 0, 1]])
    up = F.interpolate(low, size=(64, 64, 64), mode="trilinear", align_corners=False)[0, 0]
    at = torch.stack([up[3, 40, 17], up[60, 2, 33], up[0, 63, 31]])
    ref = F.binary_cross_entropy_with_logits(at, torch.tensor([1.0, 0.0, 1.0]))
    got = click_consistency_loss(low, pts, lab, 64)
    assert torch.allclose(got, ref, atol=1e-6)
    # Raising the logit under the include click lowers the loss, under the exclude click raises it.
    got.backward()
    g = low.grad[0, 0]
    assert g[0, 10, 4] < 0 and g[15, 0, 8] > 0  # low-res voxels nearest (3, 40, 17) and (60, 2, 33)
