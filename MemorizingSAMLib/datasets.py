"""Getting the real data we use, from package registries only, into ``data/`` (kept out of git).

pyradiomics 3.0.1's source archive (PyPI) ships data/: lung1 and lung2 chest CT, brain1/brain2 and breast1 MR,
one lesion label each (BSD-3-Clause, Copyright 2017 Harvard Medical School; the archive's LICENSE.txt is copied
next to the data).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_CASES = ("lung1", "lung2", "brain1", "brain2", "breast1")


def fetch_pyradiomics_data(dest: str | Path, quiet: bool = True) -> Path:
    """Download the pyradiomics sdist with pip and extract its data/*.nrrd and LICENSE.txt into
    ``dest/pyradiomics-3.0.1``; returns that folder. Does nothing if the files are already there."""
    out = Path(dest) / f"pyradiomics-{PYRADIOMICS_VERSION}"
    wanted = [f"{c}_{kind}.nrrd" for c in PYRADIOMICS_CASES for kind in ("image", "label")]
    if all((out / w).is_file() for w in wanted):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: pip only prepares metadata, whose setup.py imports numpy (present here).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation"]
        cmd += [f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", tmp] + (["-q"] if quiet else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
        if not archive.is_file():
            raise RuntimeError(f"pip could not download pyradiomics=={PYRADIOMICS_VERSION}: {r.stderr.strip()[-500:]}")
        prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/"
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                name = m.name[len(prefix) :] if m.name.startswith(prefix) else ""
                if name == "LICENSE.txt" or (name.startswith("data/") and name[5:] in wanted):
                    src = tar.extractfile(m)
                    with open(out / Path(name).name, "wb") as f:
                        shutil.copyfileobj(src, f)
    (out / "SOURCE.md").write_text(
        f"From the PyPI source archive pyradiomics-{PYRADIOMICS_VERSION}.tar.gz, folder data/.\n"
        "Licence: BSD-3-Clause, Copyright 2017 Harvard Medical School (LICENSE.txt here).\n"
    )
    return out
