"""Exact compatibility with the published SAM-Med3D / FastSAM3D code, through the public checkpoint loader.

For every fixture file in MEMSAM_COMPAT_DIR (default Testing/Data/compat, copied from shared/compat): regenerate
the recipe weights, write them to a real file in the upstream training container (with the pickled
argparse.Namespace), load it with ``load_model`` and run SPEC.md's scenarios in float64 and float32.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.compat_check import compare, fixture_identity, run_scenarios, write_upstream_checkpoint
from MemorizingSAMLib.compat_recipe import recipe_volume

COMPAT_DIR = Path(os.environ.get("MEMSAM_COMPAT_DIR", Path(__file__).parent / "Data" / "compat"))
FILES = sorted(COMPAT_DIR.glob("*.npz"))


def test_fixture_folder_is_populated():
    families = {fixture_identity(f)[0] for f in FILES}
    assert families == {"sammed3d", "fastsam3d"}, f"fixtures found in {COMPAT_DIR}: {FILES}"


@pytest.fixture(scope="module", params=FILES, ids=[f.stem for f in FILES])
def loaded(request, tmp_path_factory):
    npz = request.param
    path = write_upstream_checkpoint(npz, tmp_path_factory.mktemp("ck") / "upstream.pth")
    model64 = load_model(path, dtype=torch.float64)
    path.unlink()
    yield npz, model64


def test_input_volume_matches_recipe(loaded):
    npz, _ = loaded
    z = np.load(npz)
    v = recipe_volume(fixture_identity(npz)[1])
    fg = v[v > v.min()]
    stats = [v.sum(), (v * v).sum(), v.min(), v.max()]
    np.testing.assert_allclose(stats, z["input_checksum"][:4], rtol=1e-12)
    assert fg.size == int(z["input_n_fg"])
    idx = z["input_sample_idx"]
    np.testing.assert_array_equal(v[idx[:, 0], idx[:, 1], idx[:, 2]], z["input_sample_val"])


def test_detected_architecture(loaded):
    npz, model = loaded
    family, _ = fixture_identity(npz)
    expected = {"sammed3d": ("sam_med3d_vit_b", 100_509_232), "fastsam3d": ("fastsam3d", 53_224_240)}[family]
    assert (model.cfg.name, model.count_parameters()) == expected


def test_float64_exact(loaded):
    npz, model = loaded
    c = compare(run_scenarios(model, npz), npz)
    print(json.dumps({"file": npz.name, "fp64": c.__dict__}, indent=None))
    bad = {k: v for k, v in c.abs_diff.items() if not v <= 1e-10}
    assert not bad, f"fp64 differences above 1e-10: {bad}"
    bad = {k: v for k, v in c.rel_checksum_diff.items() if not v <= 1e-10}
    assert not bad, f"fp64 checksum differences above 1e-10 relative: {bad}"
    assert all(v <= 5e-7 for v in c.f32_arrays_abs_diff.values()), c.f32_arrays_abs_diff
    assert c.mask_flipped == 0


def test_float32_within_spec_tolerances(loaded):
    npz, model64 = loaded
    model = load_model_copy_float32(model64)
    c = compare(run_scenarios(model, npz), npz)
    print(json.dumps({"file": npz.name, "fp32": c.__dict__}, indent=None))
    assert c.worst(("S1_lowres", "S2_lowres", "S3_lowres", "S4_lowres", "image_embedding")) <= 5e-5
    assert c.worst(("S1_iou", "S2_iou", "S3_iou", "S4_iou")) <= 1e-5
    assert c.worst(("S1_sparse", "S2_sparse", "S3_sparse", "S4_sparse", "S1_dense", "dense_pe")) <= 1e-5
    assert c.mask_flipped <= 20  # 1e-5 of 128^3


def load_model_copy_float32(model64):
    import copy

    return copy.deepcopy(model64).float()
