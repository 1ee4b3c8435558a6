"""The mixed training stream (training/mixed.py): reproducible and resumable, and no held-out structure painted."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MemorizingSAMLib.fileio import write_image
from MemorizingSAMLib.modeling.config import get_config
from MemorizingSAMLib.training import mixed, procedural
from MemorizingSAMLib.training.data import TrainingData
from MemorizingSAMLib.training.mixed import MixConfig, MixedTrainingData

SMALL = procedural.ProceduralConfig(size_mm=(40.0, 60.0), radius_mm=(4.0, 9.0), structures=(2, 3))


@pytest.fixture(scope="module")
def atlas_data(tmp_path_factory):
    """One image split by structure as Colin27/AAL is: labels 1 and 3 train, 2 and 4 held out."""
    root = tmp_path_factory.mktemp("atlas")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    lab = np.zeros((40, 44, 48), np.uint8)
    lab[5:15, 5:20, 5:20] = 1
    lab[5:15, 24:40, 5:20] = 2
    lab[20:35, 5:20, 25:45] = 3
    lab[20:35, 24:40, 25:45] = 4
    img = sitk.GetImageFromArray((lab * 40.0 + 20).astype(np.float32))
    img.SetSpacing((1.2, 1.0, 1.5))
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(img)
    write_image(img, root / "images" / "a.nii.gz")
    write_image(label, root / "labels" / "a.nii.gz")
    case = {
        "id": "a",
        "image": "images/a.nii.gz",
        "label": "labels/a.nii.gz",
        "source": "atlas",
        "split": "structures",
        "labels": {str(v): f"s{v}" for v in (1, 2, 3, 4)},
        "structure_split": {"1": "train", "2": "heldout", "3": "train", "4": "heldout"},
    }
    (root / "dataset.json").write_text(json.dumps({"sources": {}, "cases": [case]}))
    return TrainingData(root)


def _stream(data, steps, per_step=2, seed=5):
    """Samples of ``steps`` as the training loop draws them: the step set, then per-sample streams."""
    from MemorizingSAMLib.training.loop import sample_rng

    cfg = get_config("memsam_hq_teacher")
    out = []
    for step in steps:
        data.set_step(step)
        for n in range(per_step):
            rng = sample_rng(seed, step, n)
            t = data.sample_target(rng)
            out.append((t.source, *data.crop(t, rng, cfg)))
    return out


def test_stream_is_reproducible_and_resumes_where_it_stopped(atlas_data):
    mix = MixConfig(p_procedural=0.5, p_synthetic=0.3, pool_size=2, refresh_every=2, procedural_config=SMALL)
    whole = _stream(MixedTrainingData(atlas_data, mix), range(12))
    sources = {s[0] for s in whole}
    assert {"procedural", "synthetic", "atlas"} <= sources
    # a new process started at step 7 (a resumed run) draws what the whole run drew from step 7 on
    resumed = _stream(MixedTrainingData(atlas_data, mix), range(7, 12))
    for a, b in zip(whole[14:], resumed, strict=True):
        assert a[0] == b[0] and all(np.array_equal(u, v) for u, v in zip(a[1:], b[1:]))
    # the pools turned over: late steps draw generated cases the first steps never saw
    early = MixedTrainingData(atlas_data, mix)
    early.set_step(0)
    first = early.procedural.live()
    early.set_step(11)
    assert 0 in first and 0 not in early.procedural.live()
    # another rank draws other cases
    other = MixedTrainingData(atlas_data, mix, rank=1)
    mine, theirs = early._make_procedural(0).targets[0], other._make_procedural(0).targets[0]
    assert not np.array_equal(mine.voxels_kji, theirs.voxels_kji)


def test_synthetic_cases_are_painted_from_train_structures_only(atlas_data, monkeypatch):
    painted = []
    real_painter = procedural.synthesise_from_labels

    def recording(label, spacing, seed, **kw):
        painted.append(np.unique(label))
        return real_painter(label, spacing, seed, **kw)

    monkeypatch.setattr(mixed.procedural, "synthesise_from_labels", recording)
    data = MixedTrainingData(atlas_data, MixConfig(p_procedural=0.0, p_synthetic=1.0, pool_size=1, refresh_every=1))
    for step in range(6):
        data.set_step(step)
        t = data.sample_target(np.random.default_rng(step))
        assert t.source == "synthetic"
    assert len(painted) >= 6
    for values in painted:
        assert set(values.tolist()) <= {0, 1, 3}, values
    assert any({1, 3} & set(v.tolist()) for v in painted)


def test_shares_are_checked(atlas_data):
    with pytest.raises(ValueError, match="sum"):
        MixConfig(p_procedural=0.8, p_synthetic=0.5)
    assert MixedTrainingData(None, MixConfig(p_procedural=1.0, p_synthetic=0.0)).real is None
    with pytest.raises(ValueError, match="real"):
        MixedTrainingData(None, MixConfig(p_procedural=0.5, p_synthetic=0.5))
    with pytest.raises(ValueError, match="real"):
        MixedTrainingData(None, MixConfig(p_procedural=0.5, p_synthetic=0.0))


def test_training_resumes_the_stream_with_the_weights(atlas_data, tmp_path):
    """A run stopped at step 2 and resumed to 4 ends where a 4-step run ends: same pools, same weights."""
    import torch

    from MemorizingSAMLib.modeling import build_sam3d
    from MemorizingSAMLib.training.loop import TrainConfig, train

    mix = MixConfig(p_procedural=0.5, p_synthetic=0.3, pool_size=2, refresh_every=1, procedural_config=SMALL)

    def run(out, steps, resume):
        torch.manual_seed(0)
        model = build_sam3d("memsam_hq_student")
        data = MixedTrainingData(atlas_data, mix)
        cfg = TrainConfig(steps=steps, batch=2, max_clicks=1, checkpoint_every=1, log_every=1, warmup=1)
        train(model, data, out, cfg, device="cpu", resume=resume)
        return model, data.procedural.live()

    whole, live_whole = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    resumed, live_resumed = run(tmp_path / "b", 4, True)
    assert live_resumed == live_whole
    for (n, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
