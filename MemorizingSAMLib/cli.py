"""``memsam``: command-line entry point.

Every sub-command reports usage errors as one line on stderr with exit code 2, and failures with exit code 1;
no tracebacks unless ``MEMSAM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import detect_architecture, read_checkpoint

    f = read_checkpoint(args.checkpoint)
    if f.config is not None:
        cfg, desc = f.config, f"{f.config.name} (MemorizingSAM checkpoint)"
    else:
        arch = detect_architecture(f.state_dict)
        cfg, desc = arch.config, arch.describe()
    n = sum(v.numel() for k, v in f.state_dict.items() if not k.endswith("positional_encoding_gaussian_matrix"))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in f.state_dict.values()})
    info = {
        "file": str(args.checkpoint),
        "architecture": desc,
        "parameters": n,
        "dtypes": dtypes,
        "model_spacing_mm": cfg.spacing_mm,
        "input_size": cfg.encoder.img_size,
        "metadata": f.metadata,
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="memsam",
        description="MemorizingSAM: interactive 3D segmentation with SAM-Med3D / FastSAM3D / Memorizing SAM models.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, dtypes, metadata")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt): upstream, bare state dict, or ours")
    p.set_defaults(func=_cmd_info)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    from .checkpoints import CheckpointError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        if os.environ.get("MEMSAM_DEBUG"):
            raise
        print(f"memsam {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
