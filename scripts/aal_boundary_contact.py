"""How much of each held-out AAL structure's boundary an image can show, against the model's Dice on it.

    .venv/bin/python scripts/aal_boundary_contact.py --data data/eval \
        --eval out/eval_memory/eval_memsam_hq_geo_memory.json --out out/aal_contact.json

AAL labels grey matter only (white matter and CSF are label 0), so where a structure's surface faces another AAL
label, both sides are grey matter in the T1 image: that boundary is drawn by the atlas, not by an intensity edge.
Per held-out AAL structure: the share of its outer faces (6-connected voxel faces, voxel grid of the labelmap) that
touch another AAL label; the mean absolute intensity step across its faces toward label 0 and toward other labels,
in units of the image's brain standard deviation, beside the same step between two voxels of the structure (the
noise and texture floor); and its outer faces per voxel (how thin it is). Joined with a `memsam evaluate` JSON:
Dice@k in thirds of the share, and the Spearman correlations of the share and of the thinness with Dice@k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from compare_evaluations import _dice_at  # scripts/ is on sys.path when this runs as a script
from scipy.stats import spearmanr


def neighbours(label_map: np.ndarray, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The 6 face neighbours of every voxel, as (label, image, valid) arrays on the same KJI grid; made once and
    shared by every structure (``valid`` is False where np.roll wrapped around)."""
    out = []
    for axis in range(3):
        for shift in (1, -1):
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
            valid = np.ones(label_map.shape, bool)
            valid[tuple(edge)] = False
            out.append((np.roll(label_map, shift, axis), np.roll(image, shift, axis), valid))
    return out


def face_statistics(label_map: np.ndarray, image: np.ndarray, nbs: list, value: int) -> dict:
    """Outer-face statistics of one label; arrays KJI, same grid, ``nbs`` from :func:`neighbours`. Steps are in
    image units."""
    inside = label_map == value
    touch_other = touch_zero = 0
    step_other: list[np.ndarray] = []
    step_zero: list[np.ndarray] = []
    step_inner: list[np.ndarray] = []  # the noise and texture floor: faces with the label on both sides
    for nb_label, nb_image, valid in nbs:
        face = inside & valid & (nb_label != value)
        other = face & (nb_label != 0)
        zero = face & (nb_label == 0)
        inner = inside & valid & (nb_label == value)
        step_inner.append(np.abs(image[inner] - nb_image[inner]))
        touch_other += int(other.sum())
        touch_zero += int(zero.sum())
        step_other.append(np.abs(image[other] - nb_image[other]))
        step_zero.append(np.abs(image[zero] - nb_image[zero]))
    total = touch_other + touch_zero
    return {
        "voxels": int(inside.sum()),
        "faces": total,
        "faces_per_voxel": total / max(int(inside.sum()), 1),
        "share_other_label": touch_other / total if total else 0.0,
        "step_zero": float(np.concatenate(step_zero).mean()) if touch_zero else 0.0,
        "step_other": float(np.concatenate(step_other).mean()) if touch_other else 0.0,
        "step_inner": float(np.concatenate(step_inner).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval", type=Path, help="a memsam evaluate JSON to join on (case, label)")
    ap.add_argument("--clicks", default="1,5,10")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ds = json.loads((args.data / "dataset.json").read_text())
    case = next(c for c in ds["cases"] if c["source"] == "mricron")
    lab_img = sitk.ReadImage(str(args.data / case["label"]))
    img = sitk.Resample(sitk.ReadImage(str(args.data / case["image"]), sitk.sitkFloat32), lab_img)
    labels = sitk.GetArrayFromImage(lab_img).astype(np.int32)
    image = sitk.GetArrayFromImage(img)
    scale = float(image[labels > 0].std()) or 1.0
    nbs = neighbours(labels, image)
    rows = {}
    for key, split in case["structure_split"].items():
        if split != "heldout" or not np.any(labels == int(key)):
            continue
        s = face_statistics(labels, image, nbs, int(key))
        s["step_zero"] /= scale
        s["step_other"] /= scale
        s["step_inner"] /= scale
        rows[int(key)] = s
    result: dict = {"case": case["id"], "structures": len(rows), "per_label": rows}
    shares = np.array([r["share_other_label"] for r in rows.values()])
    result["share_other_label_mean"] = round(float(shares.mean()), 3)
    result["step_zero_mean"] = round(float(np.mean([r["step_zero"] for r in rows.values()])), 3)
    result["step_other_mean"] = round(float(np.mean([r["step_other"] for r in rows.values()])), 3)
    result["step_inner_mean"] = round(float(np.mean([r["step_inner"] for r in rows.values()])), 3)
    print(f"{len(rows)} held-out AAL structures: {shares.mean():.1%} of their outer faces touch another AAL label")
    print(
        f"mean intensity step across a face (brain std units): to label 0 {result['step_zero_mean']:.3f}, "
        f"to another label {result['step_other_mean']:.3f}, inside the label {result['step_inner_mean']:.3f}"
    )
    if args.eval:
        targets = {t["label"]: t for t in json.loads(args.eval.read_text())["targets"] if t["case"] == case["id"]}
        keys = [k for k in rows if k in targets]
        share = np.array([rows[k]["share_other_label"] for k in keys])
        thin = np.array([rows[k]["faces_per_voxel"] for k in keys])
        thirds = np.array_split(np.argsort(share), 3)
        result["by_dice"] = {}
        for c in (int(v) for v in args.clicks.split(",")):
            dice = np.array([_dice_at(targets[k], c) for k in keys])
            rho, p = spearmanr(share, dice)
            rho_thin, p_thin = spearmanr(thin, dice)
            parts = [
                {
                    "share_range": [round(float(share[i].min()), 3), round(float(share[i].max()), 3)],
                    "dice_mean": round(float(dice[i].mean()), 3),
                }
                for i in thirds
            ]
            result["by_dice"][f"@{c}"] = {
                "spearman_rho": round(float(rho), 3),
                "p": float(p),
                "thirds": parts,
                "faces_per_voxel_spearman_rho": round(float(rho_thin), 3),
                "faces_per_voxel_p": float(p_thin),
            }
            print(
                f"Dice@{c}: Spearman rho {rho:+.3f} (p {p:.2g}); by third of share: "
                + ", ".join(f"{q['share_range'][0]:.2f}-{q['share_range'][1]:.2f}: {q['dice_mean']:.3f}" for q in parts)
                + f"; against faces per voxel (thinness) rho {rho_thin:+.3f} (p {p_thin:.2g})"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
