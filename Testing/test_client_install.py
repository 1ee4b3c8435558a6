"""The remote client alone: installed from this repository into a fresh venv that has no torch, it segments
through a real server, with the masks of the full install."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from MemorizingSAMLib.checkpoints import save_checkpoint
from MemorizingSAMLib.client import RemoteSession
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from MemorizingSAMLib.client import RemoteSession
    rng = np.random.default_rng(0)
    v = rng.normal(100, 10, (24, 48, 56)).astype(np.float32)
    v[6:18, 12:36, 14:40] += 300
    s = RemoteSession(sys.argv[1])
    s.set_image(v, spacing=(1.1, 0.9, 2.0))
    s.add_segment()
    s.add_point((30, 24, 12))
    s.add_point((20, 30, 10), include=False)
    np.save(sys.argv[2], s.mask())
    print(json.dumps({"torch": "torch" in sys.modules, "SimpleITK": "SimpleITK" in sys.modules}))
    """
)


def test_client_only_install_has_no_torch_and_segments_through_a_server(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    # From a copy of the package's sources: a build in the checkout would leave build/ behind.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "MemorizingSAMLib", src / "MemorizingSAMLib", ignore=ignore)
    core = Path("MemorizingSAM") / "MemorizingSAMCore"
    shutil.copytree(ROOT / core, src / core, ignore=ignore)
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # Every package ships, the Slicer module's logic (for the web app) among them; none is imported here.
    where = "import importlib.util as u, sys; print(*[bool(u.find_spec(m)) for m in sys.argv[1:]])"
    packages = [".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "MemorizingSAMLib").rglob("__init__.py")]
    r = subprocess.run([py, "-c", where, *packages, "MemorizingSAMCore"], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == ["True"] * (len(packages) + 1), (packages, r.stdout, r.stderr)
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = subprocess.run([venv / "bin" / "memsam", "info", "x.pt"], capture_output=True, text=True)
    assert r.returncode == 1 and "pip install 'MemorizingSAMLib[model]'" in r.stderr  # says what it lacks

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_sam3d("memsam_tiny_student"), tmp_path / "m.pt")
    with ServerProcess(["--model", ckpt, "--device", "cpu"]) as server:
        (tmp_path / "client.py").write_text(CLIENT_SCRIPT)
        r = subprocess.run(
            [py, tmp_path / "client.py", server.url, tmp_path / "mask.npy"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"torch": False, "SimpleITK": False}
        rng = np.random.default_rng(0)
        v = rng.normal(100, 10, (24, 48, 56)).astype(np.float32)
        v[6:18, 12:36, 14:40] += 300
        full = RemoteSession(server.url)
        full.set_image(v, spacing=(1.1, 0.9, 2.0))
        full.add_segment()
        full.add_point((30, 24, 12))
        full.add_point((20, 30, 10), include=False)
        mask = np.load(tmp_path / "mask.npy")
        assert mask.any() and np.array_equal(mask, full.mask())
