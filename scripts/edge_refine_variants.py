"""Issue #18, session 16: the train-split experiments behind the edge refinement's settings (docs/evaluation.md).

    .venv/bin/python scripts/edge_refine_variants.py VARIANT RADIUS_MM EPS [SOURCES]

VARIANT: fast (edge_refine.py as shipped; keep_flat with a 4th argument 'keepflat'), std (the plain guided filter
at full resolution, guide normalised by the region's standard deviation), stdres (the same, keeping the
probabilities where the image is flat), smooth (no image: the probabilities' double box mean; EPS unused), thr
(no image: p - EPS thresholded at 0.5). Train split only, 5 clicks, the shipped model with its bank; phantoms at
most 3 structures per case, other sources 15. Prints Dice at clicks 1-5.
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

import MemorizingSAMLib.edge_refine as er
from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.evaluation.runner import EvalConfig, SessionSegmenter, evaluate
from MemorizingSAMLib.memory_bank import MemoryBank
from MemorizingSAMLib.resources import default_bank_path, default_model_path


def full_resolution(residual: bool):
    """The guided filter at the volume's resolution (no coarse grid), guide normalised by its std."""

    def gf(guide, p, radius_kji, eps, keep_flat=False):
        size = tuple(2 * r + 1 for r in radius_kji)

        def box(a):
            return ndimage.uniform_filter(a, size=size, mode="nearest")

        g, p = guide.astype(np.float32), p.astype(np.float32)
        sd = float(g.std())
        if sd == 0:
            return p.copy()
        g = (g - g.mean()) / sd
        mg, mp = box(g), box(p)
        a = (box(g * p) - mg * mp) / (box(g * g) - mg * mg + np.float32(eps))
        b = mp - a * mg
        return box(a) * g + box(b) + (p - box(mp) if residual else 0)

    return gf


def smooth(guide, p, radius_kji, eps, keep_flat=False):
    size = tuple(2 * r + 1 for r in radius_kji)
    return ndimage.uniform_filter(
        ndimage.uniform_filter(p.astype(np.float32), size, mode="nearest"), size, mode="nearest"
    )


def raised_threshold(guide, p, radius_kji, eps, keep_flat=False):
    return p - np.float32(eps)


def main() -> None:
    variant, radius, eps = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    rest = sys.argv[4:]
    keep = "keepflat" in rest
    sources = tuple(next((a for a in rest if a != "keepflat"), "phantom").split(","))
    filters = {"std": full_resolution(False), "stdres": full_resolution(True), "smooth": smooth}
    filters["thr"] = raised_threshold
    if variant != "fast":
        er.guided_filter = filters[variant]  # refine() looks it up at call time
    model = load_model(default_model_path()).prepare_for_inference()
    bank = MemoryBank.load(default_bank_path(), model)
    cfg = er.EdgeRefineConfig(radius_mm=radius, eps=eps, keep_flat=keep)
    seg = SessionSegmenter(model, memory=bank, edge_refine=cfg)
    n = 3 if sources == ("phantom",) else 15
    rep = evaluate(seg, "data/eval", EvalConfig(clicks=5, split="train", sources=sources, max_targets_per_case=n))
    print(variant, radius, eps, sources, [round(x, 3) for x in rep["overall"]["dice_at_click"]], flush=True)


if __name__ == "__main__":
    main()
