"""Paired comparison of two `memsam evaluate` JSON files over the targets both hold (same case, label, name).

    .venv/bin/python scripts/compare_evaluations.py out/ship/eval_A.json out/cand/eval_B.json [--clicks 1,3,5,10]

Per source and click count: mean Dice of A and of B, the mean paired difference B - A, how many targets went up
and down, and the two-sided Wilcoxon signed-rank p (scipy; None when every difference is zero); then the share of
later clicks honoured and the median NoC@85. A target's Dice list is padded with its last value (a run that
stopped at Dice 1 keeps it), as the evaluation's own summary does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon


def _key(t: dict) -> tuple:
    return (t["case"], t["label"], t["name"])


def _dice_at(t: dict, k: int) -> float:
    d = t["dice"]
    return float(d[min(k, len(d)) - 1])


def compare(a: list[dict], b: list[dict], clicks: list[int]) -> dict:
    """Per-source paired statistics of B against A (see the module docstring)."""
    ia, ib = {_key(t): t for t in a}, {_key(t): t for t in b}
    common = sorted(set(ia) & set(ib))
    out: dict[str, dict] = {}
    for source in sorted({ia[k]["source"] for k in common}):
        keys = [k for k in common if ia[k]["source"] == source]
        row: dict = {"targets": len(keys)}
        for c in clicks:
            da = np.array([_dice_at(ia[k], c) for k in keys])
            db = np.array([_dice_at(ib[k], c) for k in keys])
            diff = db - da
            p = None if not np.any(diff) else float(wilcoxon(db, da).pvalue)
            row[f"@{c}"] = {
                "a": round(float(da.mean()), 4),
                "b": round(float(db.mean()), 4),
                "diff": round(float(diff.mean()), 4),
                "up": int((diff > 0).sum()),
                "down": int((diff < 0).sum()),
                "p": None if p is None else round(p, 5),
            }
        for name, src in (("a", ia), ("b", ib)):
            later = [h for k in keys for h in src[k].get("honoured", [])[1:]]
            row[f"honoured_{name}"] = round(float(np.mean(later)), 3) if later else None
            row[f"noc85_median_{name}"] = float(np.median([src[k]["noc85"] for k in keys]))
        out[source] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--clicks", default="1,3,5,10")
    args = ap.parse_args()
    a, b = (json.loads(p.read_text())["targets"] for p in (args.a, args.b))
    res = compare(a, b, [int(c) for c in args.clicks.split(",")])
    for source, row in res.items():
        print(f"{source} ({row['targets']} targets)")
        for k, v in row.items():
            if k.startswith("@"):
                print(
                    f"  {k:>4}: A {v['a']:.3f}  B {v['b']:.3f}  B-A {v['diff']:+.3f}"
                    f"  up {v['up']} down {v['down']}  p {v['p']}"
                )
        print(
            f"  later clicks honoured A {row['honoured_a']} B {row['honoured_b']}; median NoC85 "
            f"A {row['noc85_median_a']} B {row['noc85_median_b']}"
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
