"""Click simulation on phantoms where the right next click is known; metrics; reproducible reports; the CLI."""

import json

import numpy as np
import pytest
import torch

from MemorizingSAMLib.checkpoints import save_checkpoint
from MemorizingSAMLib.datasets import prepare_dataset
from MemorizingSAMLib.evaluation.baseline import RandomWalkerSegmenter, RegionGrowingSegmenter
from MemorizingSAMLib.evaluation.clicks import first_click, next_click
from MemorizingSAMLib.evaluation.metrics import auc, dice, noc
from MemorizingSAMLib.evaluation.runner import EvalConfig, SessionSegmenter, evaluate, strip_timings
from MemorizingSAMLib.modeling import build_sam3d

SHAPE = (40, 60, 80)  # [k, j, i]


def ball(centre_ijk, r, spacing=(1.0, 1.0, 1.0)):
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    c = centre_ijk
    return (((i - c[0]) * spacing[0]) ** 2 + ((j - c[1]) * spacing[1]) ** 2 + ((k - c[2]) * spacing[2]) ** 2) <= r**2


def test_first_click_is_the_interior_most_voxel():
    gt = ball((30, 25, 20), 8)
    assert first_click(gt).ijk == (30, 25, 20)
    # anisotropic spacing: distances are in mm, so a box elongated in voxels along k is thin in mm
    box = np.zeros(SHAPE, bool)
    box[5:35, 20:31, 30:51] = True  # 30 x 11 x 21 voxels, (k, j, i)
    # the thin j axis limits the depth to 6 mm; ties go to the first voxel in C order: smallest k, then i.
    # 3 mm slices reach 6 mm at the 2nd slice inside, 1 mm slices only at the 6th.
    assert first_click(box, spacing_ijk=(1.0, 1.0, 3.0)).ijk == (35, 25, 6)
    assert first_click(box).ijk == (35, 25, 10)


def test_missed_lobe_gets_a_positive_click_at_its_centre():
    lobe_a, lobe_b = ball((20, 30, 20), 7), ball((55, 30, 20), 6)
    gt = lobe_a | lobe_b | (ball((37, 30, 20), 2))
    pred = lobe_a.copy()
    c = next_click(gt, pred)
    assert c.include and c.ijk == (55, 30, 20)


def test_leak_gets_a_negative_click_in_it():
    gt = ball((25, 30, 20), 8)
    leak = ball((50, 30, 20), 7)
    c = next_click(gt, gt | leak)
    assert not c.include and c.ijk == (50, 30, 20)


def test_larger_error_wins_and_perfect_prediction_stops():
    gt = ball((25, 30, 20), 8)
    small_leak, big_miss = ball((60, 10, 10), 3), ball((25, 30, 20), 8) & ~ball((25, 30, 20), 4)
    c = next_click(gt, (gt & ~big_miss) | small_leak)
    assert c.include
    assert next_click(gt, gt.copy()) is None


def test_metrics():
    assert dice(np.ones((2, 2, 2)), np.ones((2, 2, 2))) == 1.0
    assert noc([0.5, 0.79, 0.81, 0.9], 0.8) == 3
    assert noc([0.5, 0.6], 0.9) == 2  # capped at the number of clicks
    assert auc([0.5, 1.0]) == 0.75


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("data"), sources=("phantom",), phantom_seeds=(1000, 1001))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(build_sam3d("memsam_tiny_student"), tmp_path_factory.mktemp("ck") / "tiny.pt")


def test_dataset_layout(phantom_data):
    meta = json.loads((phantom_data / "dataset.json").read_text())
    assert [c["split"] for c in meta["cases"]] == ["heldout", "heldout"]
    for c in meta["cases"]:
        assert (phantom_data / c["image"]).is_file() and (phantom_data / c["label"]).is_file() and c["labels"]
    assert meta["sources"]["phantom"]["licence"]


def test_two_runs_give_identical_reports(phantom_data, tiny_ckpt):
    from MemorizingSAMLib.checkpoints import load_model

    cfg = EvalConfig(clicks=3, max_targets_per_case=2)
    reports = []
    for _ in range(2):
        model = load_model(tiny_ckpt).prepare_for_inference()
        reports.append(evaluate(SessionSegmenter(model), phantom_data, cfg))
    a, b = (json.dumps(strip_timings(r), sort_keys=True) for r in reports)
    assert a == b
    assert reports[0]["overall"]["targets"] == 4 and len(reports[0]["overall"]["dice_at_click"]) == 3
    base = [evaluate(RegionGrowingSegmenter(), phantom_data, cfg) for _ in range(2)]
    assert json.dumps(strip_timings(base[0]), sort_keys=True) == json.dumps(strip_timings(base[1]), sort_keys=True)


def test_legacy_protocol_locks_crop_on_ground_truth(phantom_data, tiny_ckpt):
    from MemorizingSAMLib.checkpoints import load_model

    model = load_model(tiny_ckpt)
    seg = SessionSegmenter(model, legacy=True)
    rep = evaluate(seg, phantom_data, EvalConfig(clicks=2, legacy=True, max_targets_per_case=1))
    assert rep["protocol"].startswith("legacy")
    t = rep["targets"][0]
    assert t["reported_dice"] == max(t["dice"])
    assert seg.session.segments[seg.seg].state.locked


def test_evaluate_cli_end_to_end(phantom_data, tiny_ckpt, tmp_path, memsam):
    out = tmp_path / "eval"
    r = memsam(
        "evaluate",
        "--model",
        tiny_ckpt,
        "--data",
        phantom_data,
        "--clicks",
        "2",
        "--max-targets",
        "1",
        "--baseline",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert "dice_vs_clicks.png" in files and "eval_memsam_tiny_student.json" in files
    assert "eval_sitk_region_growing.json" in files and "montage_memsam_tiny_student.png" in files
    rep = json.loads((out / "eval_sitk_region_growing.json").read_text())
    assert rep["overall"]["targets"] == 2 and (out / "dice_vs_clicks.png").read_bytes()[:4] == b"\x89PNG"
    r = memsam("evaluate", "--data", tmp_path / "none")
    assert r.returncode == 1 and "dataset.json" in r.stderr and "Traceback" not in r.stderr


def test_random_walker_baseline_follows_the_clicks():
    """The second classic baseline: include clicks grow a bright ball's segment, an exclude click in a touching
    ball keeps that one out; through the same interface as the model."""
    import SimpleITK as sitk

    a, b = ball((30, 30, 20), 9), ball((47, 30, 20), 7)
    vol = np.where(a, 400.0, np.where(b, 380.0, 100.0)) + np.random.default_rng(0).normal(0, 10, SHAPE)
    rw = RandomWalkerSegmenter()
    rw.set_image(sitk.GetImageFromArray(vol.astype(np.float32)))
    rw.new_target()
    m = rw.click((30, 30, 20), True).astype(bool)
    assert dice(m, a) > 0.7, dice(m, a)
    m = rw.click((47, 30, 20), False).astype(bool)
    assert dice(m, a) > 0.8 and not m[20, 30, 47] and rw.last_latency_ms > 0


class _FixedMask:
    """A segmenter that answers every click with the same mask: the harness must count the clicks it ignores."""

    name = "fixed"
    last_latency_ms = 0.0

    def __init__(self, mask):
        self.mask = mask.astype(np.uint8)

    def new_target(self):
        pass

    def click(self, ijk, include):
        return self.mask


def test_later_clicks_honoured_counts_ignored_clicks():
    from MemorizingSAMLib.evaluation.metrics import aggregate
    from MemorizingSAMLib.evaluation.runner import run_target

    gt = ball((30, 30, 20), 10)
    half = gt.copy()
    half[:, :, 33:] = False  # the right half is missed: every next click asks for it and is ignored
    r = run_target(_FixedMask(half), gt.astype(np.uint8), (1.0, 1.0, 1.0), 4)
    assert r["honoured"] == [1, 0, 0, 0]
    assert all(c[3] == 1 for c in r["clicks"])
    whole = run_target(_FixedMask(gt), gt.astype(np.uint8), (1.0, 1.0, 1.0), 4)
    assert whole["honoured"] == [1]  # perfect at once: no next click
    leak = gt | ball((52, 30, 20), 6)
    r2 = run_target(_FixedMask(leak), gt.astype(np.uint8), (1.0, 1.0, 1.0), 3)
    assert r2["honoured"] == [1, 0, 0] and r2["clicks"][1][3] == 0  # exclude clicks left inside the mask
    assert aggregate([r, r2], 4)["later_clicks_honoured"] == 0.0
