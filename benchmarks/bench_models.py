"""Encoder, prompt encoder + mask decoder times of the published architectures (recipe weights), fp32 and bf16.

    python benchmarks/bench_models.py --json

Median of --repeats runs after a warm-up, torch threads = cores, batch 1, 128^3 input. Also reports the bf16
low-res-logit agreement with fp32 for the same input and click.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, median_time, recipe_model, setup_threads  # noqa: E402

from MemorizingSAMLib.capabilities import bf16_note  # noqa: E402
from MemorizingSAMLib.compat_recipe import recipe_volume  # noqa: E402


def bench(config: str, dtype: torch.dtype, repeats: int, device: str) -> dict:
    model = recipe_model(config, dtype, device)
    vol = torch.from_numpy(recipe_volume("a")).to(device=device, dtype=dtype)[None, None]
    pts = torch.tensor([[[40, 70, 90]]], device=device)
    lab = torch.tensor([[1]], device=device)
    with torch.inference_mode():
        enc_s, _ = median_time(lambda: model.encode(vol), repeats)
        emb = model.encode(vol)
        prev = torch.zeros(1, 1, 32, 32, 32, device=device, dtype=dtype)
        low, _ = model.decode(emb, pts, lab, prev)
        # A refinement click: previous logits as the mask prompt, as every click after the first.
        dec_s, _ = median_time(lambda: model.decode(emb, pts, lab, low), max(repeats, 60), warmup=5)
    return {"encoder_s": enc_s, "decoder_ms": dec_s * 1e3, "low": low.float()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    setup_threads()
    out: dict = {"machine": machine_info(), "device": args.device, "repeats": args.repeats}
    # bf16 only where it is native: on generic kernels a bf16 ViT-B encode takes minutes, and says nothing.
    bf16_skipped = bf16_note(args.device)
    if bf16_skipped:
        out["bf16_skipped"] = bf16_skipped
    for config, key in (("sam_med3d_vit_b", "sam_med3d"), ("fastsam3d", "fastsam3d")):
        f32 = bench(config, torch.float32, args.repeats, args.device)
        out[f"{key}_encoder_s"] = round(f32["encoder_s"], 4)
        out[f"{key}_decoder_ms"] = round(f32["decoder_ms"], 2)
        if bf16_skipped:
            continue
        b16 = bench(config, torch.bfloat16, args.repeats, args.device)
        out[f"{key}_encoder_bf16_s"] = round(b16["encoder_s"], 4)
        out[f"{key}_decoder_bf16_ms"] = round(b16["decoder_ms"], 2)
        diff = (f32["low"] - b16["low"]).abs()
        agree = ((f32["low"] > 0) == (b16["low"] > 0)).float().mean().item()
        out[f"{key}_bf16_lowres_max_abs_diff"] = round(diff.max().item(), 4)
        out[f"{key}_bf16_lowres_sign_agreement"] = round(agree, 5)
    # The decoder is the same module in both published models; quote the FastSAM3D run as "the" decoder time.
    out["decoder_ms"] = out["fastsam3d_decoder_ms"]
    if not bf16_skipped:
        out["decoder_bf16_ms"] = out["fastsam3d_decoder_bf16_ms"]
    emit(out, args.json)


if __name__ == "__main__":
    main()
