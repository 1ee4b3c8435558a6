"""Average two checkpoints of the same config (weight-space interpolation, as in model soups / SWA).

``--weight w`` gives ``(1 - w) * A + w * B`` for every floating-point tensor; integer buffers are taken from A.
Both files must hold the same config; the result is written in our format (fp16 with ``--half``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from MemorizingSAMLib.checkpoints import load_model, save_checkpoint


def average_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """The interpolated state dict; the key sets and shapes must agree."""
    if a.keys() != b.keys():
        raise ValueError(f"the checkpoints hold different keys: {sorted(a.keys() ^ b.keys())[:6]}")
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise ValueError(f"{k}: shapes {tuple(va.shape)} and {tuple(vb.shape)} differ")
        out[k] = torch.lerp(va, vb.to(va.dtype), w) if va.is_floating_point() else va.clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--weight", type=float, default=0.5, help="weight of B in [0, 1] (default 0.5)")
    ap.add_argument("--half", action="store_true", help="store fp16 weights")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not 0.0 <= args.weight <= 1.0:
        ap.error(f"--weight must lie in [0, 1], got {args.weight}")
    ma, mb = load_model(args.a), load_model(args.b)
    if ma.cfg != mb.cfg:
        ap.error(f"{args.a} and {args.b} hold different configs ({ma.cfg.name} / {mb.cfg.name})")
    ma.load_state_dict(average_state(ma.state_dict(), mb.state_dict(), args.weight))
    meta = {"averaged": [str(args.a), str(args.b)], "weight_of_b": args.weight}
    print(f"wrote {save_checkpoint(ma, args.out, metadata=meta, half=args.half)}")


if __name__ == "__main__":
    main()
