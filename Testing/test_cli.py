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
