"""Training curves of a run as a PNG: the loss and training Dice from its log, and held-out Dice of the weights
it kept (``--keep-every``) after 1 and 5 simulated clicks on the real held-out targets.

    .venv/bin/python scripts/training_curves.py --run runs/hq_teacher --data data/eval \
        --out docs/images/training_curves.png

Also writes the figures as JSON beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def held_out(checkpoint: Path, data: str, max_targets: int, clicks: int) -> dict:
    from MemorizingSAMLib.checkpoints import load_model
    from MemorizingSAMLib.evaluation.runner import EvalConfig, SessionSegmenter, evaluate

    model = load_model(checkpoint).prepare_for_inference()
    cfg = EvalConfig(
        clicks=clicks, split="heldout", sources=("pyradiomics", "mricron"), max_targets_per_case=max_targets
    )
    o = evaluate(SessionSegmenter(model), data, cfg)["overall"]
    return {"targets": o["targets"], "dice_at_click": o["dice_at_click"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder (train_log.jsonl, train_step*.pt)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--tag", default="train")
    ap.add_argument("--max-targets", type=int, default=20, help="AAL structures per case (time)")
    ap.add_argument("--clicks", type=int, default=5)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from MemorizingSAMLib.fileio import atomic_text

    run = Path(args.run)
    log = [json.loads(x) for x in (run / f"{args.tag}_log.jsonl").read_text().splitlines() if x.strip()]
    steps = np.array([r["step"] for r in log])
    kept = sorted(run.glob(f"{args.tag}_step*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    curve = []
    for ck in kept:
        step = int(re.findall(r"\d+", ck.stem)[-1])
        curve.append({"step": step, **held_out(ck, args.data, args.max_targets, args.clicks)})
        print(f"step {step}: held-out Dice per click {[round(d, 3) for d in curve[-1]['dice_at_click']]}")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    k = 8  # log lines per moving-average window
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
    ax[0].plot(steps[k - 1 :], smooth([r["loss"] for r in log]), label="loss (Dice + BCE)")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[1].plot(steps[k - 1 :], smooth([r["dice"] for r in log]), label="training Dice (last click)", alpha=0.6)
    if curve:
        for c, style in ((0, "o-"), (args.clicks - 1, "s-")):
            ax[1].plot([x["step"] for x in curve], [x["dice_at_click"][c] for x in curve], style,
                       label=f"held-out real Dice@{c + 1} ({curve[0]['targets']} targets)")  # fmt: skip
    ax[1].set_xlabel("step")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.suptitle(f"{run.name}: training and held-out curves")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    atomic_text(Path(args.out).with_suffix(".json"), json.dumps({"run": str(run), "held_out": curve}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
