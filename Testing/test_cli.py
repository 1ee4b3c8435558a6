"""The ``memsam`` entry point, run as a real subprocess."""

import json
import subprocess
import sys

import torch

from MemorizingSAMLib.checkpoints import save_checkpoint
from MemorizingSAMLib.modeling import build_sam3d


def run(*args):
    return subprocess.run([sys.executable, "-m", "MemorizingSAMLib.cli", *args], capture_output=True, text=True)


def test_info_describes_our_checkpoint(tmp_path):
    path = save_checkpoint(build_sam3d("memsam_tiny_student"), tmp_path / "m.pt", metadata={"k": 1})
    r = run("info", str(path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"].startswith("memsam_tiny_student") and info["metadata"] == {"k": 1}
    assert info["parameters"] == build_sam3d("memsam_tiny_student").count_parameters()


def test_info_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    for target in (tmp_path / "missing.pth", bad):
        r = run("info", str(target))
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_build_memory_from_folders(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from MemorizingSAMLib.memory_bank import MemoryBank

    model = build_sam3d("memsam_tiny_student")
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for c in range(2):
        img = np.random.default_rng(c).normal(0, 1, (20, 30, 30)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        lab[5:15, 5:15, 5:15] = 1
        lab[5:15, 18:28, 18:28] = 3
        sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "images" / f"case{c}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "labels" / f"case{c}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "3": "spleen"}}))
    out = tmp_path / "bank.msam"
    r = run(
        "build-memory",
        "--model",
        str(ckpt),
        "--images",
        str(tmp_path / "images"),
        "--labels",
        str(tmp_path / "labels"),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "4 entries from 2 cases" in r.stdout and "2/2" in r.stderr
    bank = MemoryBank.load(out)
    assert sorted(e["label"] for e in bank.entries) == ["liver", "liver", "spleen", "spleen"]
    r = run(
        "build-memory",
        "--model",
        str(ckpt),
        "--images",
        str(tmp_path / "nope"),
        "--labels",
        str(tmp_path / "labels"),
        "--out",
        str(out),
    )
    assert r.returncode == 1 and "not a folder" in r.stderr and "Traceback" not in r.stderr
