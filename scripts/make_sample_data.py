"""Write the small sample data shipped in Resources/SampleData (run once; the output is committed).

- lung2_crop: pyradiomics 3.0.1 data/lung2 CT (held-out case), a 100 x 100 x 70 mm box around its lesion label.
- colin27_crop: Debian mricron-data Colin27 T1 (ch2) with AAL labels, a 96 mm box around the right basal ganglia,
  keeping four held-out (right-hemisphere) structures: Caudate_R, Putamen_R, Thalamus_R, Hippocampus_R.

    python scripts/make_sample_data.py data/downloads Resources/SampleData
"""

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MemorizingSAMLib.datasets import fetch_mricron_data, fetch_pyradiomics_data


def crop_around(img, lab, centre_lps, size_mm):
    lo = img.TransformPhysicalPointToIndex([float(c - s / 2 * d) for c, s, d in zip(centre_lps, size_mm, (1, 1, 1))])
    hi = img.TransformPhysicalPointToIndex([float(c + s / 2 * d) for c, s, d in zip(centre_lps, size_mm, (1, 1, 1))])
    lo_i = [max(0, min(a, b)) for a, b in zip(lo, hi)]
    hi_i = [min(n, max(a, b) + 1) for a, b, n in zip(lo, hi, img.GetSize())]
    size = [h - l for l, h in zip(lo_i, hi_i)]
    return sitk.RegionOfInterest(img, size, lo_i), sitk.RegionOfInterest(lab, size, lo_i)


def centre_of(lab, values):
    a = sitk.GetArrayViewFromImage(lab)
    kji = np.argwhere(np.isin(a, values)).mean(0)
    return lab.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]])


def main(cache, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pr = fetch_pyradiomics_data(cache)
    img, lab = sitk.ReadImage(str(pr / "lung2_image.nrrd")), sitk.ReadImage(str(pr / "lung2_label.nrrd"))
    lab = sitk.Cast(lab > 0, sitk.sitkUInt8)
    ci, cl = crop_around(img, lab, centre_of(lab, [1]), (100, 100, 70))
    sitk.WriteImage(ci, str(out / "lung2_crop.nii.gz"), useCompression=True)
    sitk.WriteImage(cl, str(out / "lung2_crop_label.nii.gz"), useCompression=True)
    mr = fetch_mricron_data(cache)
    img, lab = sitk.ReadImage(str(mr / "ch2.nii.gz")), sitk.ReadImage(str(mr / "aal.nii.gz"))
    keep = {72: "Caudate_R", 74: "Putamen_R", 78: "Thalamus_R", 38: "Hippocampus_R"}
    arr = sitk.GetArrayFromImage(lab)
    arr = np.where(np.isin(arr, list(keep)), arr, 0).astype(np.uint8)
    lab2 = sitk.GetImageFromArray(arr)
    lab2.CopyInformation(lab)
    ci, cl = crop_around(img, lab2, centre_of(lab2, [72, 74, 78]), (96, 96, 96))
    sitk.WriteImage(ci, str(out / "colin27_crop.nii.gz"), useCompression=True)
    sitk.WriteImage(cl, str(out / "colin27_crop_label.nii.gz"), useCompression=True)
    meta = {
        "name": "MemorizingSAM sample data",
        "layout_version": 1,
        "cases": [
            {
                "id": "lung2_crop",
                "image": "lung2_crop.nii.gz",
                "label": "lung2_crop_label.nii.gz",
                "source": "pyradiomics",
                "split": "heldout",
                "labels": {"1": "lung2_lesion"},
            },
            {
                "id": "colin27_crop",
                "image": "colin27_crop.nii.gz",
                "label": "colin27_crop_label.nii.gz",
                "source": "mricron",
                "split": "heldout",
                "labels": {str(k): v for k, v in keep.items()},
            },
        ],
        "sources": {
            "pyradiomics": {
                "name": "pyradiomics 3.0.1 source archive (PyPI), data/lung2",
                "licence": "BSD-3-Clause, Copyright 2017 Harvard Medical School",
            },
            "mricron": {
                "name": "Debian mricron-data 1.2.20211006+dfsg-4: ch2.nii.gz (Colin27) and aal.nii.gz",
                "licence": "BSD-3-Clause per Debian (Chris Rorden); AAL atlas: Tzourio-Mazoyer et al., "
                "NeuroImage 15:273-289 (2002), its authors' terms apply",
            },
        },
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
