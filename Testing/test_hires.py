"""High-resolution mask-head features (modeling/hires.py): where a packed feature lands, and that every decode path
agrees."""

import pytest
import torch

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
from MemorizingSAMLib.modeling import build_sam3d, hires
from MemorizingSAMLib.modeling.config import get_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_sam3d("memsam_hq_student").eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return m


def _prompt():
    return torch.tensor([[[30.0, 33.0, 29.0]]]), torch.tensor([[1]])


def _decode_paths(m, emb, prev):
    """Logits of the same prompt through the autograd path, the chunked inference path and the prepared path."""
    pts, lab = _prompt()
    with torch.enable_grad():
        grad_path = m.decode(emb, pts, lab, prev)[0].detach()
    with torch.no_grad():
        chunked = m.decode(emb, pts, lab, prev)[0]
        prepared = m.decode(m.prepare_embedding(emb), pts, lab, prev)[0]
    return grad_path, chunked, prepared


def test_embedding_carries_the_features_and_published_configs_do_not(model):
    enc = model.cfg.encoder
    with torch.no_grad():
        emb = model.encode(torch.randn(1, 1, 64, 64, 64))
    assert emb.shape == (1, enc.out_chans + 64 * enc.out_chans // 8, 8, 8, 8) == (1, enc.embedding_channels, 8, 8, 8)
    for name in ("sam_med3d_vit_b", "fastsam3d", "memsam_tiny_memory"):
        cfg = get_config(name).encoder
        assert cfg.embedding_channels == cfg.out_chans and not cfg.hires_features


def test_a_packed_feature_changes_exactly_its_own_low_res_voxel(model):
    """Row order: a stem feature at low-res voxel (x, y, z), packed, must change the logits there and nowhere else,
    on every decode path (a wrong permutation in packing or unpacking moves or spreads it)."""
    with torch.no_grad():
        emb = model.encode(torch.randn(1, 1, 64, 64, 64))
    prev = torch.randn(1, 1, 32, 32, 32)
    base = _decode_paths(model, emb, prev)
    c = model.cfg.encoder.out_chans
    for x, y, z in [(13, 7, 30), (0, 31, 2), (17, 16, 16)]:
        bump = torch.zeros(1, c // 8, 32, 32, 32)
        bump[0, :, x, y, z] = 3.0  # what the stem would give for a change at that voxel
        e2 = emb.clone()
        e2[:, c:] += hires.pack(bump, 8)
        for before, after in zip(base, _decode_paths(model, e2, prev)):
            diff = (after - before).abs()[0, 0]
            assert diff[x, y, z] > 1e-3
            diff[x, y, z] = 0
            assert diff.max() < 1e-6


def test_decode_paths_agree_and_the_stem_learns(model, tmp_path):
    with torch.no_grad():
        emb = model.encode(torch.randn(1, 1, 64, 64, 64))
    a, b, c = _decode_paths(model, emb, torch.randn(1, 1, 32, 32, 32))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    m = build_sam3d("memsam_hq_student")
    x = torch.randn(1, 1, 64, 64, 64)
    pts, lab = _prompt()
    low, _ = m.decode(m.encode(x), pts, lab, None)
    low.square().mean().backward()
    assert m.image_encoder.hires_stem.conv1.weight.grad.abs().sum() > 0
    # a checkpoint of it is read back with the stem
    path = save_checkpoint(model, tmp_path / "hq.pt")
    back = load_model(path)
    with torch.no_grad():
        assert torch.equal(back.encode(x), model.encode(x))
