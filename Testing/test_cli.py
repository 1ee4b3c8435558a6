"""The ``memsam`` entry point, run as a real subprocess."""

import json

import torch

from MemorizingSAMLib.checkpoints import save_checkpoint
from MemorizingSAMLib.modeling import build_sam3d


def test_info_describes_our_checkpoint(tmp_path, memsam):
    path = save_checkpoint(build_sam3d("memsam_tiny_student"), tmp_path / "m.pt", metadata={"k": 1})
    r = memsam("info", str(path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"].startswith("memsam_tiny_student") and info["metadata"] == {"k": 1}
    assert info["parameters"] == build_sam3d("memsam_tiny_student").count_parameters()


def test_info_errors_are_one_line(tmp_path, memsam):
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    for target in (tmp_path / "missing.pth", bad):
        r = memsam("info", str(target))
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = memsam("frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_build_memory_from_folders(tmp_path, memsam):
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
    r = memsam(
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
    r = memsam(
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


def phantom_file(tmp_path, ext):
    import numpy as np
    import SimpleITK as sitk

    from MemorizingSAMLib.phantoms import make_phantom

    img, lab, names = make_phantom(1003)
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated in-plane: not an identity grid
    lab.CopyInformation(img)
    path = tmp_path / f"phantom{ext}"
    sitk.WriteImage(img, str(path))
    value = next(v for v, n in names.items() if n.startswith(("ellipsoid", "lobed")))
    gt = sitk.GetArrayFromImage(lab) == value
    k, j, i = np.argwhere(gt).mean(0).round().astype(int)
    while not gt[k, j, i]:  # fall back to any voxel of the structure
        k, j, i = np.argwhere(gt)[len(np.argwhere(gt)) // 2]
    lps = img.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
    return path, img, gt, (i, j, k), (-lps[0], -lps[1], lps[2])


import pytest  # noqa: E402


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_segment_writes_labelmap_with_input_geometry_at_the_structure(tmp_path, ext, memsam):
    import numpy as np
    import SimpleITK as sitk

    path, img, gt, (i, j, k), ras = phantom_file(tmp_path, ext)
    out = tmp_path / f"labels{ext}"
    r = memsam("segment", str(path), "--point", ",".join(f"{v:.3f}" for v in ras), "--out", str(out))
    assert r.returncode == 0, r.stderr
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    lab = sitk.GetArrayFromImage(back) > 0
    # at the prompted structure: the clicked voxel, most of the structure, and a Dice no mask elsewhere could reach
    # (the small shipped model over-segments this phantom somewhat)
    overlap = (lab & gt).sum()
    assert lab[k, j, i] and overlap >= 0.5 * gt.sum() and 2 * overlap / (lab.sum() + gt.sum()) > 0.4
    # voxel indices give the same result, up to the rounding of the RAS -> index round trip (~1e-5 voxels, which
    # flipped 1 boundary voxel of 4,115 with the click-map model); a wrong axis or a whole-voxel shift changes
    # hundreds
    out2 = tmp_path / f"labels_ijk{ext}"
    r = memsam("segment", str(path), "--point", f"{i},{j},{k}:include", "--coords", "ijk", "--out", str(out2))
    assert r.returncode == 0, r.stderr
    by_ijk = sitk.GetArrayFromImage(sitk.ReadImage(str(out2))) > 0
    assert (by_ijk != lab).sum() <= max(2, lab.sum() // 1000)


def test_segment_wrong_usage_is_one_line(tmp_path, memsam):
    path, img, gt, ijk, ras = phantom_file(tmp_path, ".nii.gz")
    other = save_checkpoint(build_sam3d("memsam_small_teacher"), tmp_path / "teacher.pt")
    torch.save({"model_state_dict": {"conv.weight": torch.zeros(3, 3)}}, tmp_path / "foreign.pth")
    cases = [
        (["segment", str(tmp_path / "missing.nii.gz"), "--point", "0,0,0", "--out", "x.nii.gz"], "no such image"),
        (
            ["segment", str(path), "--point", "9999,0,0", "--coords", "ijk", "--out", str(tmp_path / "o.nii.gz")],
            "outside",
        ),
        (["segment", str(path), "--point", "1,2", "--out", str(tmp_path / "o.nii.gz")], "three numbers"),
        (["segment", str(path), "--frobnicate", "--out", str(tmp_path / "o.nii.gz")], "unrecognized arguments"),
        (
            [
                "segment",
                str(path),
                "--point",
                "0,0,0",
                "--model",
                str(tmp_path / "foreign.pth"),
                "--out",
                str(tmp_path / "o.nii.gz"),
            ],
            "not a SAM-Med3D-family checkpoint",
        ),
        (
            [
                "segment",
                str(path),
                "--point",
                "0,0,0",
                "--model",
                str(other),
                "--memory",
                "Resources/models/memsam_hq_geo.bank.msam",
                "--out",
                str(tmp_path / "o.nii.gz"),
            ],
            "encoder",
        ),
    ]
    for args, text in cases:
        r = memsam(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


def test_segment_never_leaves_a_truncated_labelmap(tmp_path):
    """A write that fails part-way (here a 1 KB file-size limit, as `ulimit -f 1`) exits non-zero, names the file,
    and leaves the existing labelmap byte for byte as it was (ITK does not always report the short write)."""
    import resource
    import subprocess
    import sys

    path, img, gt, (i, j, k), ras = phantom_file(tmp_path, ".nii.gz")
    out = tmp_path / "labels.nii.gz"
    old = bytes(range(256)) * 40  # 10 KB that must survive
    out.write_bytes(old)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    cmd = [
        sys.executable,
        "-m",
        "MemorizingSAMLib.cli",
        "segment",
        str(path),
        "--point",
        f"{i},{j},{k}",
        "--coords",
        "ijk",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode != 0 and "wrote" not in r.stdout, (r.stdout, r.stderr)
    assert str(out) in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("labels")) == ["labels.nii.gz"]


def test_segment_refuses_outputs_it_cannot_write_before_running(tmp_path, memsam):
    import os

    path, img, gt, (i, j, k), ras = phantom_file(tmp_path, ".nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    cases = [
        (tmp_path / "slice.png", "write a 3D image as one of"),
        (tmp_path, "is a folder"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((locked / "labels.nii.gz", "not writable"))
    for out, text in cases:
        r = memsam("segment", str(path), "--point", f"{i},{j},{k}", "--coords", "ijk", "--out", str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and text in lines[0], (out, r.stderr)
        assert "voxels" not in r.stdout  # refused before the model ran
    assert not (tmp_path / "slice.png").exists()


def test_segment_refuses_a_truncated_image(tmp_path, memsam):
    path, img, gt, (i, j, k), ras = phantom_file(tmp_path, ".nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[:-200])
    r = memsam("segment", str(cut), "--point", f"{i},{j},{k}", "--coords", "ijk", "--out", str(tmp_path / "o.nii.gz"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "damaged gzip" in lines[0], r.stderr
    assert not (tmp_path / "o.nii.gz").exists()
