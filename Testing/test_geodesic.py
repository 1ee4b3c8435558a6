"""Geodesic click maps (modeling/geodesic.py, click_maps.py with memsam_hq_geo): the sweeps against Dijkstra on the
same graph, the maps following a region in (x, y, z) order, the converted model keeping its logits, and training
and the session going through the new channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import logits, perturbed, session_mask
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.modeling.click_maps import N_CHANNELS, _city_block, click_map_channels, widen_state
from MemorizingSAMLib.modeling.config import get_config
from MemorizingSAMLib.modeling.geodesic import FAR, geodesic_distance
from MemorizingSAMLib.modeling.hires import split_embedding
from MemorizingSAMLib.training.memory_finetune import convert_for_memory

CROP, LOW = 64, 32


def _dijkstra(image: np.ndarray, seeds: np.ndarray, lam: float) -> np.ndarray:
    """Exact 6-connected geodesic distances, edge cost 1 + lam |I(a) - I(b)|, by scipy's Dijkstra."""
    idx = np.arange(image.size).reshape(image.shape)
    rows, cols, w = [], [], []
    for axis in range(3):
        a = np.moveaxis(idx, axis, 0)
        v = np.moveaxis(image, axis, 0)
        rows.append(a[:-1].ravel())
        cols.append(a[1:].ravel())
        w.append((1.0 + lam * np.abs(v[1:] - v[:-1])).ravel())
    r, c, ww = (np.concatenate(x) for x in (rows, cols, w))
    graph = coo_matrix((np.r_[ww, ww], (np.r_[r, c], np.r_[c, r])), shape=(image.size, image.size)).tocsr()
    d = dijkstra(graph, indices=np.flatnonzero(seeds), min_only=True)
    return d.reshape(image.shape)


def test_sweeps_match_dijkstra_and_bound_it_from_above():
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    image = np.stack([gaussian_filter(rng.normal(size=(10, 11, 12)), 1.5) * 4 for _ in range(2)])
    seeds = np.zeros((2, 2, 10, 11, 12), dtype=bool)
    seeds[0, 0, 1, 2, 3] = seeds[0, 0, 8, 9, 10] = True
    seeds[0, 1, 5, 0, 11] = True
    seeds[1, 0, 0, 0, 0] = True
    seeds[1, 1, 9, 10, 11] = True
    img_t, seeds_t = torch.tensor(image), torch.tensor(seeds)
    for lam in (0.0, 4.0):
        exact = np.stack([[_dijkstra(image[b], seeds[b, k], lam) for k in range(2)] for b in range(2)])
        many = geodesic_distance(img_t, seeds_t, lam, rounds=12).numpy()
        np.testing.assert_allclose(many, exact, rtol=1e-9, atol=1e-9)
        two = geodesic_distance(img_t, seeds_t, lam, rounds=2).numpy()
        assert np.all(two >= exact - 1e-9)  # an upper bound: the cost of real paths
        assert np.mean(two - exact) < 0.1 * np.mean(exact)
    # lam 0: the city-block distance after one round.
    l1 = geodesic_distance(img_t, seeds_t, 0.0, rounds=1)[1, 0].numpy()
    i, j, k = np.indices((10, 11, 12))
    np.testing.assert_array_equal(l1, i + j + k)
    # The click maps' closed-form city-block distance (the excess's baseline) is the same, per side.
    idx = torch.tensor([[[1, 2, 3], [8, 9, 10], [5, 0, 11], [4, 4, 4]]])
    labels = torch.tensor([[1, 1, 0, -1]])
    cb = _city_block(idx, labels, 12)[0, :, :10, :11]
    np.testing.assert_array_equal(cb.numpy(), geodesic_distance(img_t[:1], seeds_t[:1], 0.0, rounds=1)[0].numpy())
    # No seed: FAR everywhere.
    assert float(geodesic_distance(img_t, torch.zeros_like(seeds_t), 4.0).min()) == FAR


def _bar_image(axis: int) -> torch.Tensor:
    """(1, L, L, L) zeros with a bar of 3s along ``axis`` (low-res voxels 4..27 there, 14..17 across)."""
    img = torch.zeros(LOW, LOW, LOW)
    sl = [slice(14, 18)] * 3
    sl[axis] = slice(4, 28)
    img[tuple(sl)] = 3.0
    return img[None]


def _geo(points, labels, image):
    pts, labs = torch.tensor([points], dtype=torch.float32), torch.tensor([labels])
    return click_map_channels(pts, labs, None, LOW, CROP, 1, torch.float32, torch.device("cpu"), image)[0]


def test_geodesic_maps_follow_the_clicked_region_in_xyz_order():
    # Crop voxel (13, 32, 32) lies in low-res voxel (6, 16, 16): one end of a bar along x.
    click = [13.0, 32.0, 32.0]
    maps = _geo([click], [1], _bar_image(0))
    inc, exc = maps[N_CHANNELS], maps[N_CHANNELS + 2]
    assert maps.shape == (N_CHANNELS + 4, LOW, LOW, LOW)
    assert float(inc[26, 16, 16]) > 0.99  # 20 voxels along the bar: no edge crossed
    assert float(inc[6, 24, 16]) < 0.01 and float(inc[6, 16, 24]) < 0.01  # 8 voxels across its edge
    assert float(exc.abs().max()) == 0.0  # no exclude click
    # The same bar along y, clicked at low-res (16, 6, 16): 20 voxels along y is inside, 10 along x is beyond.
    along_y = _geo([[32.0, 13.0, 32.0]], [1], _bar_image(1))[N_CHANNELS]
    assert float(along_y[16, 26, 16]) > 0.99 and float(along_y[26, 6, 16]) < 0.01
    # An exclude click fills the exclude maps; an ignored one changes nothing.
    both = _geo([click, [13.0, 60.0, 10.0]], [1, 0], _bar_image(0))
    assert torch.equal(both[N_CHANNELS], inc) and float(both[N_CHANNELS + 2, 6, 30, 5]) > 0.99
    ignored = _geo([click, [13.0, 60.0, 10.0]], [1, -1], _bar_image(0))
    torch.testing.assert_close(ignored, maps)


def test_converted_geo_model_keeps_its_logits_then_uses_the_image(tmp_path):
    src = perturbed("memsam_hq_clicks")
    with torch.no_grad():
        src.mask_decoder.click_maps.conv.weight.normal_(0, 0.5)
    geo = convert_for_memory(src, get_config("memsam_hq_geo")).eval()
    crop = torch.randn(1, 1, CROP, CROP, CROP)
    with torch.no_grad():
        e_src, e_geo = src.encode(crop), geo.encode(crop)
    assert e_geo.shape[1] == get_config("memsam_hq_geo").encoder.embedding_channels == e_src.shape[1] + 64
    low = split_embedding(e_geo, geo.cfg.encoder.out_chans)[2]
    torch.testing.assert_close(low, torch.nn.functional.avg_pool3d(crop, 2)[:, 0])
    pts, labs = torch.tensor([[[41.0, 10.0, 3.0], [12.0, 50.0, 40.0]]]), torch.tensor([[1, 0]])
    prev = torch.randn(1, 1, LOW, LOW, LOW)
    for prepared in (False, True):
        assert torch.equal(logits(src, e_src, pts, labs, prev, prepared), logits(geo, e_geo, pts, labs, prev, prepared))
    with torch.no_grad():
        geo.mask_decoder.click_maps.conv.weight[:, N_CHANNELS:].normal_(0, 1.0)
    changed = (logits(geo, e_geo, pts, labs, prev) - logits(src, e_src, pts, labs, prev)).abs()
    assert float(changed.max()) > 1e-3
    torch.testing.assert_close(logits(geo, e_geo, pts, labs, prev), logits(geo, e_geo, pts, labs, prev, True))
    back = load_model(save_checkpoint(geo, tmp_path / "geo.pt")).eval()
    assert back.cfg.name == "memsam_hq_geo"
    assert torch.equal(logits(back, e_geo, pts, labs, prev), logits(geo, e_geo, pts, labs, prev))
    # The geodesic head needs the image: an embedding without it is refused by name.
    with pytest.raises(ValueError, match="low-res image"):
        logits(geo, e_src, pts, labs, prev)


def test_widen_state_only_adds_input_channels():
    w = torch.randn(48, 5, 1, 1, 1)
    key = "mask_decoder.click_maps.conv.weight"
    wide = widen_state({key: w}, {key: torch.empty(48, 9, 1, 1, 1)})[key]
    assert torch.equal(wide[:, :5], w) and float(wide[:, 5:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="cannot widen"):
        widen_state({key: torch.randn(48, 9, 1, 1, 1)}, {key: w})


def test_finetune_memory_into_geo_trains_the_geodesic_columns(tmp_path, memsam):
    data = prepare_dataset(tmp_path / "d", sources=("phantom",), phantom_seeds=(0, 1))
    init = save_checkpoint(perturbed("memsam_hq_clicks"), tmp_path / "clicks.pt")
    args = ["--data", data, "--sources", "phantom", "--steps", "2", "--batch", "1", "--log-every", "1"]
    r = memsam("finetune-memory", "--model", init, "--config", "memsam_hq_geo", *args, "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    tuned = load_model(tmp_path / "m" / "model.pt").eval()
    assert tuned.cfg.name == "memsam_hq_geo"
    assert tuned.mask_decoder.click_maps.conv.weight[:, N_CHANNELS:].abs().max() > 0
    img = sorted((data / "images").iterdir())[0]

    # The session's (prepared) decode goes through the geodesic columns: strong ones change the mask.
    cols = tuned.mask_decoder.click_maps.conv.weight[:, N_CHANNELS:]
    with torch.no_grad():
        cols.zero_()
        without = session_mask(tuned, img)
        torch.manual_seed(1)
        cols.normal_(0, 5.0)
    strong = session_mask(tuned, img)
    assert without.shape == strong.shape and (without != strong).any()
