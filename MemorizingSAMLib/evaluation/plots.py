"""PNG figures of an evaluation: Dice vs clicks, and a montage of cases (image, ground truth, prediction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dice_curve(reports: list[dict], path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for r in reports:
        d = r["overall"].get("dice_at_click", [])
        ax.plot(range(1, len(d) + 1), d, marker="o", label=f"{r['method']} ({r['protocol'].split(' ')[0]})")
    ax.set_xlabel("click")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Dice after each simulated click")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)
    return Path(path)


def montage(examples: list[dict], path: str | Path) -> Path:
    """One row per example: the slice through its first click, image / ground truth / prediction overlays."""
    plt = _plt()
    n = max(1, len(examples))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), dpi=100, squeeze=False)
    for row, ex in zip(axes, examples):
        k = int(ex["click"][2])
        img = ex["image"][k].astype(np.float32)
        lo, hi = np.percentile(img, [1, 99])
        for ax, (title, overlay) in zip(
            row, (("image", None), ("ground truth", ex["gt"][k]), ("prediction", ex["pred"][k]))
        ):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if overlay is not None and overlay.any():
                ax.contour(
                    overlay > 0, levels=[0.5], colors=["lime" if title == "ground truth" else "red"], linewidths=0.8
                )
            if title == "image":
                ax.plot(ex["click"][0], ex["click"][1], "y+", markersize=8)
            ax.set_title(f"{ex['case']} {ex['name']}\n{title}" if title == "image" else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)
    return Path(path)
