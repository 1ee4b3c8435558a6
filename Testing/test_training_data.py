"""Labels on their image's grid: the phantoms as written, the check that guards training and evaluation, and the
training crop of a phantom target holding that target (sessions up to 14 trained on phantom labels shifted in z)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MemorizingSAMLib.datasets import check_label_grid, prepare_dataset
from MemorizingSAMLib.evaluation.runner import EvalConfig, evaluate
from MemorizingSAMLib.modeling.config import get_config
from MemorizingSAMLib.phantoms import make_phantom
from MemorizingSAMLib.training.data import AugmentConfig, TrainingData

NO_AUG = AugmentConfig(max_rotation_deg=0.0, max_scale=0.0, flip=False, intensity=0.0, noise=0.0, p_random_click=0.0)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("d"), sources=("phantom",), phantom_seeds=(0, 1, 1000))


@pytest.mark.parametrize("seed", [0, 5, 1003])
def test_phantom_label_shares_the_image_grid(seed):
    img, lab, _ = make_phantom(seed)
    assert lab.GetOrigin() == img.GetOrigin()
    assert lab.GetSpacing() == img.GetSpacing() and lab.GetDirection() == img.GetDirection()
    check_label_grid(img, lab, f"phantom {seed}")


def test_check_label_grid_names_case_and_field():
    img, lab, _ = make_phantom(2)
    shifted = sitk.Image(lab)
    shifted.SetOrigin(tuple(np.add(lab.GetOrigin(), (0.0, 0.0, 12.0))))
    with pytest.raises(ValueError, match=r"case_x: .*origin"):
        check_label_grid(img, shifted, "case_x")
    small = sitk.RegionOfInterest(lab, [10, 10, 10], [0, 0, 0])
    with pytest.raises(ValueError, match=r"size"):
        check_label_grid(img, small, "case_y")


def test_training_crop_holds_the_target(phantom_data):
    """The crop around a phantom target's interior voxel, without augmentation, holds as many mm^3 of the target
    as the target has, for targets that fit in the crop (a label shifted off its image holds almost none)."""
    data = TrainingData(phantom_data)
    cfg = get_config("memsam_hq_clicks")
    extent_mm = cfg.encoder.img_size * cfg.spacing_mm
    checked = 0
    for tgt in data.targets["phantom"]:
        img = data.images[tgt.case]
        sp_kji = np.asarray(img.GetSpacing())[::-1]
        span = (tgt.voxels_kji.max(0) - tgt.voxels_kji.min(0) + 1) * sp_kji
        if np.any(span > 0.8 * extent_mm):
            continue
        _, y, click = data.crop(tgt, np.random.default_rng(0), cfg, NO_AUG)
        expected = len(tgt.voxels_kji) * float(np.prod(sp_kji)) / cfg.spacing_mm**3
        assert 0.8 * expected < y.sum() < 1.2 * expected, (tgt.case, tgt.name, y.sum(), expected)
        c = click.astype(int)
        assert y[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2].mean() > 0.5
        checked += 1
    assert checked >= 3


def test_training_and_evaluation_refuse_a_label_off_its_grid(phantom_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(phantom_data, bad)
    case = json.loads((bad / "dataset.json").read_text())["cases"][0]
    lab = sitk.ReadImage(str(bad / case["label"]))
    lab.SetOrigin(tuple(np.add(lab.GetOrigin(), (0.0, 0.0, 30.0))))
    sitk.WriteImage(lab, str(bad / case["label"]))
    with pytest.raises(ValueError, match=case["id"] + r": the label is not on the image's grid"):
        TrainingData(bad)

    class Never:
        name = "never"

        def set_image(self, image):
            raise AssertionError("evaluation went on with a label off its image's grid")

    with pytest.raises(ValueError, match=case["id"]):
        evaluate(Never(), bad, EvalConfig(split=case["split"], clicks=1))
