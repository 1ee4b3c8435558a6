"""The procedural training data: reproducible from a seed, varied, in the ranges it promises."""

import numpy as np
import SimpleITK as sitk

from MemorizingSAMLib.training.procedural import ProceduralConfig, sample_case, synthesise_from_labels, targets

SMALL = ProceduralConfig(size_mm=(40.0, 60.0), max_voxels=200_000)


def test_cases_are_reproducible_and_varied():
    a, b, c = sample_case(3, SMALL), sample_case(3, SMALL), sample_case(4, SMALL)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image))
    assert np.array_equal(a.label, b.label) and a.names == b.names
    assert a.image.GetSize() != c.image.GetSize() or not np.array_equal(a.label, c.label)
    spacings = {sample_case(s, SMALL).image.GetSpacing() for s in range(8)}
    assert len(spacings) > 1


def test_labels_images_and_targets_agree():
    for seed in range(4):
        case = sample_case(seed, SMALL)
        arr = sitk.GetArrayViewFromImage(case.image)
        assert arr.shape == case.label.shape and np.isfinite(arr).all()
        assert -1200 <= arr.min() and arr.max() <= 5000 and arr.std() > 0
        assert set(np.unique(case.label)) - {0} == set(case.names)
        d = np.asarray(case.image.GetDirection()).reshape(3, 3)
        assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
        for name, m in targets(case, np.random.default_rng(seed)):
            assert m.dtype == bool and m.shape == case.label.shape and m.sum() >= 8, name


def test_labels_painted_in_an_unseen_contrast():
    label = np.zeros((20, 30, 30), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    label[5:15, 15:25, 10:20] = 3
    image, moved = synthesise_from_labels(label, (1.0, 1.0, 2.0), seed=1)
    assert image.shape == label.shape and set(np.unique(moved)) == {0, 1, 3}
    assert 0 < (moved != label).mean() < 0.2  # deformed, not scrambled
    means = [image[moved == v].mean() for v in (0, 1, 3)]
    assert len({round(float(m)) for m in means}) == 3
