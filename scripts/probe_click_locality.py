"""Does one include click segment the structure, or only a blob around the click?

For held-out real targets (the two pyradiomics lesions, 6 random right-hemisphere AAL structures) one session per
click: a single include click at the target's interior-most voxel, then at up to 3 other interior voxels about
24 mm (AAL) or 8 mm (lesions) away. Prints, per off-centre click: whether its voxel is in its own mask, the IoU of
its mask with the centre click's mask, and its Dice. A model that knows the structure gives high IoU.

    .venv/bin/python scripts/probe_click_locality.py Resources/models/memsam_hq_clicks.pt [data/eval]

Clicks are (i, j, k) voxel indices; arrays are [k, j, i]; distances in mm.
"""

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.session import InteractiveSession


def one_click_mask(model, image: sitk.Image, kji) -> np.ndarray:
    session = InteractiveSession(model)
    session.set_image(image)
    seg = session.add_segment("probe")
    session.add_point((int(kji[2]), int(kji[1]), int(kji[0])))
    return session.mask(seg).astype(bool)


def main(model_path: str, root: str = "data/eval") -> None:
    root = Path(root)
    cases = json.loads((root / "dataset.json").read_text())["cases"]
    model = load_model(model_path).prepare_for_inference()
    rng = np.random.default_rng(0)
    for case in cases:
        if case["split"] not in ("heldout", "structures") or case["source"] not in ("pyradiomics", "mricron"):
            continue
        image = sitk.ReadImage(str(root / case["image"]))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / case["label"])))
        spacing_kji = np.array(image.GetSpacing())[::-1]
        keys = list(case["labels"])
        if case["split"] == "structures":
            keys = [k for k in keys if case["structure_split"][k] == "heldout"]
            keys = [keys[i] for i in rng.choice(len(keys), 6, replace=False)]
        lesion = case["source"] == "pyradiomics"
        for key in keys:
            gt = labels == int(key)
            depth = ndimage.distance_transform_edt(gt, sampling=spacing_kji)
            centre = np.unravel_index(np.argmax(depth), gt.shape)
            m0 = one_click_mask(model, image, centre)
            inside = np.argwhere(gt & (depth > 1.5))
            dist = np.linalg.norm((inside - np.array(centre)) * spacing_kji, axis=1)
            far = inside[np.abs(dist - (8 if lesion else 24)) < (3 if lesion else 6)]
            rows = []
            for p in far[rng.choice(len(far), min(3, len(far)), replace=False)] if len(far) else []:
                m = one_click_mask(model, image, p)
                iou = (m & m0).sum() / max((m | m0).sum(), 1)
                d = 2 * (m & gt).sum() / (m.sum() + gt.sum())
                rows.append(f"in own mask {bool(m[tuple(p)])}, IoU {iou:.2f}, Dice {d:.2f}")
            d0 = 2 * (m0 & gt).sum() / (m0.sum() + gt.sum())
            print(f"{case['labels'][key]}: centre click Dice {d0:.2f}; off-centre: " + "; ".join(rows), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
