"""Per-target and aggregated metrics of an interactive run."""

from __future__ import annotations

import numpy as np

NOC_THRESHOLDS = (0.80, 0.85, 0.90)


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    g, p = gt > 0, pred > 0
    denom = int(g.sum()) + int(p.sum())
    return 1.0 if denom == 0 else 2.0 * int((g & p).sum()) / denom


def noc(dices: list[float], threshold: float) -> int:
    """Number of clicks to reach ``threshold``; the number of clicks run if never reached (capped)."""
    for n, d in enumerate(dices, start=1):
        if d >= threshold:
            return n
    return len(dices)


def auc(dices: list[float]) -> float:
    """Area under the Dice-vs-click curve over clicks 1..N, normalised to [0, 1]: the mean Dice."""
    return float(np.mean(dices)) if dices else 0.0


def summarise(dices: list[float]) -> dict:
    out = {f"noc{int(t * 100)}": noc(dices, t) for t in NOC_THRESHOLDS}
    out["auc"] = round(auc(dices), 6)
    out["best_dice"] = round(max(dices), 6) if dices else 0.0
    return out


def aggregate(results: list[dict], n_clicks: int) -> dict:
    """Mean Dice at each click, mean NoC and AUC over a list of per-target results."""
    if not results:
        return {"targets": 0}
    d = np.array([r["dice"] + [r["dice"][-1]] * (n_clicks - len(r["dice"])) for r in results])
    out = {
        "targets": len(results),
        "dice_at_click": [round(float(v), 6) for v in d.mean(0)],
        "auc": round(float(np.mean([r["auc"] for r in results])), 6),
        "best_dice": round(float(np.mean([r["best_dice"] for r in results])), 6),
    }
    for t in NOC_THRESHOLDS:
        key = f"noc{int(t * 100)}"
        out[key] = round(float(np.mean([r[key] for r in results])), 4)
    # Clicks 2.. (the first is where the crop is centred): the share whose voxel ends up on the side it asked for.
    later = [h for r in results for h in r.get("honoured", [])[1:]]
    if later:
        out["later_clicks_honoured"] = round(float(np.mean(later)), 4)
    return out
