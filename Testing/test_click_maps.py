"""Click maps in the mask head (modeling/click_maps.py): where a click is drawn, that a converted model keeps its
logits until trained, that the maps act voxel by voxel on every decode path, and that checkpoints keep them."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from model_helpers import logits, perturbed, session_mask

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.modeling.click_maps import N_CHANNELS, SIGMAS_LOW_RES, click_map_channels
from MemorizingSAMLib.modeling.config import MaskDecoderConfig, Sam3DConfig, get_config
from MemorizingSAMLib.training.memory_finetune import convert_for_memory

CROP, LOW = 64, 32


def _reference_maps(points: np.ndarray, labels: np.ndarray, low: int, crop: int) -> np.ndarray:
    """Brute force over a meshgrid: (2 S, L, L, L) include then exclude, one per sigma, axes (x, y, z)."""
    # A crop voxel index p covers [p, p + 1); the low-res voxel v covers [v, v + 1) * crop / low.
    centres = (np.arange(low) + 0.5) * crop / low
    gx, gy, gz = np.meshgrid(centres, centres, centres, indexing="ij")
    out = []
    for want in (1, 0):
        for s in SIGMAS_LOW_RES:
            acc = np.zeros((low, low, low))
            for p, lab in zip(points, labels):
                if lab != want:
                    continue
                d2 = ((gx - p[0] - 0.5) ** 2 + (gy - p[1] - 0.5) ** 2 + (gz - p[2] - 0.5) ** 2) * (low / crop) ** 2
                acc += np.exp(-d2 / (2 * s * s))
            out.append(np.minimum(acc, 1.0))
    return np.stack(out)


def test_maps_match_a_brute_force_drawing_in_xyz_order():
    pts = np.array([[41.0, 10.0, 3.0], [42.0, 11.0, 4.0], [5.0, 60.0, 33.0], [20.0, 20.0, 50.0]])
    labs = np.array([1, 1, 0, -1])
    got = click_map_channels(
        torch.tensor(pts[None]), torch.tensor(labs[None]), None, LOW, CROP, 1, torch.float64, torch.device("cpu")
    )
    assert got.shape == (1, N_CHANNELS, LOW, LOW, LOW)
    ref = _reference_maps(pts, labs, LOW, CROP)
    np.testing.assert_allclose(got[0, :-1].numpy(), ref, atol=1e-9)
    # The narrow include map peaks at the clicked voxel's low-res voxel, axes (x, y, z): crop (41, 10, 3) lies in
    # low-res (20, 5, 1); the exclude map peaks at (2, 30, 16); the ignored click (-1) is drawn nowhere.
    inc, exc = got[0, 0], got[0, len(SIGMAS_LOW_RES)]
    assert np.unravel_index(int(inc.argmax()), inc.shape) == (20, 5, 1)
    assert np.unravel_index(int(exc.argmax()), exc.shape) == (2, 30, 16)
    assert float(inc[10, 10, 25]) < 1e-6 and float(exc[10, 10, 25]) < 1e-6
    assert float(got[0, -1].abs().max()) == 0.0  # no mask prompt


def test_previous_mask_channel_and_batch_broadcast():
    prev = torch.randn(3, 1, LOW, LOW, LOW)
    pts, labs = torch.tensor([[[10.0, 20.0, 30.0]]]), torch.tensor([[1]])
    got = click_map_channels(pts, labs, prev, LOW, CROP, 3, torch.float32, torch.device("cpu"))
    assert got.shape == (3, N_CHANNELS, LOW, LOW, LOW)
    assert torch.allclose(got[:, -1], torch.sigmoid(prev[:, 0]) - 0.5)
    assert torch.equal(got[0, :-1], got[2, :-1])  # one click set, drawn for every mask prompt
    none = click_map_channels(None, None, None, LOW, CROP, 2, torch.float32, torch.device("cpu"))
    assert none.shape == (2, N_CHANNELS, LOW, LOW, LOW) and float(none.abs().max()) == 0.0


@pytest.fixture(scope="module")
def models():
    src = perturbed("memsam_hq_memory")
    return src, convert_for_memory(src, get_config("memsam_hq_clicks")).eval()


def test_converted_model_gives_its_old_logits_then_acts_voxel_by_voxel(models, tmp_path):
    src, clicks = models
    with torch.no_grad():
        emb = src.encode(torch.randn(1, 1, CROP, CROP, CROP))
    pts, labs = torch.tensor([[[41.0, 10.0, 3.0], [12.0, 50.0, 40.0]]]), torch.tensor([[1, 0]])
    prev = torch.randn(1, 1, LOW, LOW, LOW)
    for prepared in (False, True):
        assert torch.equal(logits(src, emb, pts, labs, prev, prepared), logits(clicks, emb, pts, labs, prev, prepared))

    # Weight on the narrow include map only: the logits change around the include click and nowhere far from it
    # (the maps enter pointwise), the same on the plain and the prepared path.
    trained = convert_for_memory(src, get_config("memsam_hq_clicks")).eval()
    with torch.no_grad():
        trained.mask_decoder.click_maps.conv.weight[:, 0] = torch.randn(
            trained.mask_decoder.click_maps.conv.out_channels, 1, 1, 1
        )
    base = logits(src, emb, pts, labs, prev)
    for prepared in (False, True):
        diff = (logits(trained, emb, pts, labs, prev, prepared) - base).abs()[0, 0]
        assert diff[20, 5, 1] > 1e-3
        assert diff[6, 25, 20] < 1e-6 and diff[20, 5, 20] < 1e-6
    assert torch.allclose(logits(trained, emb, pts, labs, prev), logits(trained, emb, pts, labs, prev, True), atol=1e-4)

    # Ignored clicks (-1) draw nothing: the trained head gives the source's logits for them, where the prompt
    # tokens of both see the same ignored point.
    ign = torch.tensor([[-1, -1]])
    assert torch.allclose(logits(trained, emb, pts, ign, None), logits(src, emb, pts, ign, None), atol=1e-6)

    # Gradients reach the head from the loss, and a checkpoint keeps config and head.
    with torch.enable_grad():
        low, _ = trained.decode(emb, pts, labs, prev)
        low.square().mean().backward()
    assert trained.mask_decoder.click_maps.conv.weight.grad.abs().sum() > 0
    back = load_model(save_checkpoint(trained, tmp_path / "clicks.pt"))
    assert back.cfg.name == "memsam_hq_clicks" and back.mask_decoder.click_maps is not None
    assert torch.equal(logits(back.eval(), emb, pts, labs, prev), logits(trained, emb, pts, labs, prev))


def test_click_maps_need_the_high_resolution_rows():
    m = get_config("memsam_tiny_memory")
    md = MaskDecoderConfig(**{**asdict(m.mask_decoder), "click_maps": True})
    with pytest.raises(ValueError, match="click_maps needs encoder.hires_features"):
        build_sam3d(Sam3DConfig(**{**m.__dict__, "mask_decoder": md}))


def test_finetune_memory_into_the_click_maps_config_trains_the_head(tmp_path, memsam):
    """The shipped model's config -> memsam_hq_clicks through the command line: the head leaves zero (its own
    learning-rate group) and a session decodes with it."""
    data = prepare_dataset(tmp_path / "d", sources=("phantom",), phantom_seeds=(0, 1))
    init = save_checkpoint(perturbed("memsam_hq_memory"), tmp_path / "hq.pt")
    args = ["--data", data, "--sources", "phantom", "--steps", "2", "--batch", "1", "--log-every", "1"]
    r = memsam("finetune-memory", "--model", init, "--config", "memsam_hq_clicks", *args, "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    tuned = load_model(tmp_path / "m" / "model.pt").eval()
    assert tuned.cfg.name == "memsam_hq_clicks"
    assert tuned.mask_decoder.click_maps.conv.weight.abs().max() > 0
    img = sorted((data / "images").iterdir())[0]

    # The session's decode goes through the head: a strong head changes the mask a zero one gives.
    head = tuned.mask_decoder.click_maps.conv
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        zero = session_mask(tuned, img)
        torch.manual_seed(1)
        head.weight.normal_(0, 5.0)
    strong = session_mask(tuned, img)
    assert zero.shape == strong.shape and (zero != strong).any()
