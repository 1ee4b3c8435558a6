"""Which way of turning a box into prompts works best for a model without box embeddings? Measured on the
held-out real targets of a prepared dataset: the box is the target's bounding box (+2 voxels), one box, no click.

    python scripts/measure_boxes.py MODEL DATA_DIR > out/boxes.json
"""

import json
import sys

import numpy as np
import SimpleITK as sitk

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.datasets import load_dataset, targets
from MemorizingSAMLib.evaluation.metrics import dice
from MemorizingSAMLib.session import InteractiveSession, SessionOptions

VARIANTS = {
    "center_click": SessionOptions(box_strategy="center_click", clamp_to_box=False),
    "center_click+clamp": SessionOptions(box_strategy="center_click", clamp_to_box=True),
    "center_click+box_mask_prompt": SessionOptions(box_strategy="center_click_mask_prompt", clamp_to_box=False),
    "center_click+box_mask_prompt+clamp": SessionOptions(box_strategy="center_click_mask_prompt", clamp_to_box=True),
}


def main(model_path, root):
    model = load_model(model_path).prepare_for_inference()
    meta = load_dataset(root)
    rows = []
    for case in meta["cases"]:
        if case["source"] not in ("pyradiomics", "mricron"):
            continue
        tg = targets(case, "heldout")
        if not tg:
            continue
        img = sitk.ReadImage(f"{root}/{case['image']}")
        lab = sitk.GetArrayFromImage(sitk.ReadImage(f"{root}/{case['label']}"))
        sessions = {k: InteractiveSession(model, opt) for k, opt in VARIANTS.items()}
        for s in sessions.values():
            s.set_image(img)
        for value, name in tg:
            gt = lab == value
            if gt.sum() < 20:
                continue
            k, j, i = np.nonzero(gt)
            lo = np.maximum([i.min() - 2, j.min() - 2, k.min() - 2], 0)
            hi = np.minimum([i.max() + 2, j.max() + 2, k.max() + 2], np.array(img.GetSize()) - 1)
            row = {"case": case["id"], "target": name}
            for key, s in sessions.items():
                seg = s.add_segment(name)
                s.add_box(lo, hi, seg)
                row[key] = round(dice(gt, s.mask(seg)), 4)
            rows.append(row)
    summary = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in VARIANTS}
    print(json.dumps({"model": model_path, "targets": len(rows), "mean_dice": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
