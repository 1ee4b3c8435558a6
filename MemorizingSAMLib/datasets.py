"""The data we evaluate and train on, from package registries only, in one simple layout (kept out of git).

Sources:
- pyradiomics 3.0.1's source archive (PyPI): data/ with lung1 and lung2 chest CT, brain1/brain2 and breast1 MR,
  one lesion label each (BSD-3-Clause, Copyright 2017 Harvard Medical School; its LICENSE.txt is copied along).
- Debian's mricron-data (1.2.20211006+dfsg-4): the Colin27 T1 template ch2.nii.gz and the AAL atlas aal.nii.gz on
  the same 1 mm grid, 116 named structures (aal.nii.txt). Debian ships the package under MRIcron's BSD-3-Clause
  (Copyright 2006-2010 Chris Rorden); the AAL atlas is the work of Tzourio-Mazoyer et al. (NeuroImage 15:273-289,
  2002), whose own terms of use apply and who ask to be cited.
- synthetic phantoms of our own (phantoms.py), reproducible from a seed.

Layout written by :func:`prepare_dataset`::

    DIR/images/<case>.nii.gz   DIR/labels/<case>.nii.gz   DIR/dataset.json

dataset.json lists every case with its source, split ("train" or "heldout") and label names, and the sources
with version and licence. Splits: pyradiomics lung1/brain1/breast1 train, lung2/brain2 held out; Colin27/AAL is
one image, split by structure: left-hemisphere and midline structures (odd AAL index) train, right-hemisphere
(even index) held out; phantoms: seeds 0-39 train, 1000-1009 held out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .fileio import atomic_text, write_image

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


MRICRON_DEB = "mricron-data"


def fetch_mricron_data(dest: str | Path) -> Path:
    """``apt-get download mricron-data`` and extract ch2.nii.gz, aal.nii.gz, aal.nii.txt and the copyright file
    into ``dest/mricron-data``; returns that folder. Does nothing if they are already there."""
    out = Path(dest) / "mricron-data"
    wanted = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
    if all((out / w).is_file() for w in wanted):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", MRICRON_DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("mricron-data_*.deb"))
        if not debs:
            raise RuntimeError(
                f"apt-get could not download {MRICRON_DEB} (run 'apt-get update' first?): {r.stderr.strip()[-300:]}"
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        base = Path(tmp) / "x" / "usr" / "share"
        for w in wanted:
            shutil.copy(base / "mricron" / "templates" / w, out / w)
        shutil.copy(base / "doc" / "mricron-data" / "copyright", out / "copyright")
        version = debs[0].name.split("_")[1]
    (out / "SOURCE.md").write_text(
        f"Debian package mricron-data {version}: usr/share/mricron/templates/{{ch2.nii.gz,aal.nii.gz,aal.nii.txt}}.\n"
        "Debian licence of the package: BSD-3-Clause (Copyright 2006-2010 Chris Rorden), see copyright.\n"
        "AAL atlas: Tzourio-Mazoyer et al., NeuroImage 15:273-289 (2002); its authors' terms apply; cite them.\n"
    )
    return out


def aal_names(txt: str | Path) -> dict[int, str]:
    """AAL index -> structure name from aal.nii.txt ("index name code" per line)."""
    names = {}
    for line in Path(txt).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


SOURCES = {
    "pyradiomics": {
        "name": "pyradiomics source archive data/",
        "version": PYRADIOMICS_VERSION,
        "registry": "PyPI",
        "licence": "BSD-3-Clause (Copyright 2017 Harvard Medical School)",
    },
    "mricron": {
        "name": "Debian mricron-data (Colin27 ch2 + AAL)",
        "version": "1.2.20211006+dfsg-4",
        "registry": "Debian",
        "licence": "BSD-3-Clause per Debian (Chris Rorden); AAL: Tzourio-Mazoyer et al. 2002, its authors' terms apply",
    },
    "phantom": {
        "name": "MemorizingSAM synthetic phantoms",
        "version": "1",
        "registry": "generated",
        "licence": "Apache-2.0 (ours)",
    },
}

PYRADIOMICS_SPLIT = {"lung1": "train", "brain1": "train", "breast1": "train", "lung2": "heldout", "brain2": "heldout"}
PHANTOM_TRAIN_SEEDS = tuple(range(40))
PHANTOM_HELDOUT_SEEDS = tuple(range(1000, 1010))


def prepare_dataset(
    dest: str | Path,
    sources: tuple[str, ...] = ("pyradiomics", "mricron", "phantom"),
    cache: str | Path | None = None,
    phantom_seeds: tuple[int, ...] | None = None,
) -> Path:
    """Fetch/generate the data and write the layout above; returns ``dest``. Downloads go to ``cache``
    (default ``dest/../downloads``)."""
    import SimpleITK as sitk

    from .phantoms import make_phantom

    dest = Path(dest)
    cache = Path(cache) if cache else dest.parent / "downloads"
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    cases = []

    def add(case, image, label, source, split, labels, structure_split=None):
        write_image(image, dest / "images" / f"{case}.nii.gz")
        write_image(label, dest / "labels" / f"{case}.nii.gz")
        entry = {
            "id": case,
            "image": f"images/{case}.nii.gz",
            "label": f"labels/{case}.nii.gz",
            "source": source,
            "split": split,
            "labels": {str(k): v for k, v in labels.items()},
        }
        if structure_split:
            entry["structure_split"] = {str(k): v for k, v in structure_split.items()}
        cases.append(entry)

    if "pyradiomics" in sources:
        pr = fetch_pyradiomics_data(cache)
        for c in PYRADIOMICS_CASES:
            img = sitk.ReadImage(str(pr / f"{c}_image.nrrd"))
            lab = sitk.ReadImage(str(pr / f"{c}_label.nrrd"))
            lab = sitk.Cast(lab > 0, sitk.sitkUInt8)
            lab.CopyInformation(img)
            add(f"pyradiomics_{c}", img, lab, "pyradiomics", PYRADIOMICS_SPLIT[c], {1: f"{c}_lesion"})
    if "mricron" in sources:
        mr = fetch_mricron_data(cache)
        img = sitk.ReadImage(str(mr / "ch2.nii.gz"))
        lab = sitk.Cast(sitk.ReadImage(str(mr / "aal.nii.gz")), sitk.sitkUInt8)
        names = aal_names(mr / "aal.nii.txt")
        split = {k: ("train" if k % 2 == 1 else "heldout") for k in names}
        add("colin27_aal", img, lab, "mricron", "structures", names, split)
    if "phantom" in sources:
        seeds = phantom_seeds if phantom_seeds is not None else PHANTOM_TRAIN_SEEDS + PHANTOM_HELDOUT_SEEDS
        for seed in seeds:
            img, lab, names = make_phantom(seed)
            add(f"phantom_{seed:04d}", img, lab, "phantom", "heldout" if seed >= 1000 else "train", names)
    meta = {
        "name": "MemorizingSAM evaluation data",
        "layout_version": 1,
        "sources": {k: v for k, v in SOURCES.items() if k in sources},
        "cases": cases,
    }
    atomic_text(dest / "dataset.json", json.dumps(meta, indent=1))
    return dest


def load_dataset(root: str | Path) -> dict:
    """dataset.json of a prepared folder, with a clear error if there is none."""
    f = Path(root) / "dataset.json"
    if not f.is_file():
        raise FileNotFoundError(f"{root}: no dataset.json (run 'memsam data fetch --out {root}')")
    return json.loads(f.read_text())


def targets(case: dict, split: str | None) -> list[tuple[int, str]]:
    """(label value, name) of the case's structures in ``split`` (None: all)."""
    out = []
    for k, name in case["labels"].items():
        s = case.get("structure_split", {}).get(k, case["split"])
        if split is None or s == split:
            out.append((int(k), name))
    return sorted(out)


def check_label_grid(image, label, case: str, tol_mm: float = 1e-3) -> None:
    """Raise ValueError unless the SimpleITK ``label`` lies on ``image``'s voxel grid: same size, and spacing, origin
    (mm) and direction equal within ``tol_mm``. Training resamples labels through their own headers and evaluation
    indexes them by the image's voxels, so a label on another grid would silently train or score the wrong voxels."""
    import numpy as np

    problems = []
    if tuple(label.GetSize()) != tuple(image.GetSize()):
        problems.append(f"size {label.GetSize()} vs the image's {image.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = (np.asarray(getattr(x, f"Get{what}")()) for x in (label, image))
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tol_mm):
            ours, theirs = (tuple(np.round(v, 4).tolist()) for v in (a, b))
            problems.append(f"{what.lower()} {ours} vs the image's {theirs}")
    if problems:
        raise ValueError(
            f"{case}: the label is not on the image's grid ({'; '.join(problems)}); data written before session 15 "
            "had phantom labels shifted in z: run 'memsam data fetch' again"
        )
