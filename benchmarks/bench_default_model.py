"""The shipped default model on CPU: encoder time (with and without its memory bank) and the click time of a
session on the pyradiomics lung2 CT, with the bank, exact fp32.

    python benchmarks/bench_default_model.py --json > benchmarks/results_default_model.json

Encoder: median of --repeats encodes of the crop a first click on the lesion gives. Clicks: one first click
(encodes), then --clicks refinement clicks within 19 mm of the lesion (2 include : 1 exclude), each timed end to
end as the session reports it (model + paste of the changed region).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, median_time, setup_threads  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model  # noqa: E402
from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.geometry import CropGrid, Geometry, normalize_crop, resample_to_crop  # noqa: E402
from MemorizingSAMLib.memory_bank import MemoryBank  # noqa: E402
from MemorizingSAMLib.resources import default_bank_path, default_model_path  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession, SessionOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--model", help="a candidate checkpoint instead of the shipped model (with --bank)")
    ap.add_argument("--bank", help="the candidate's memory bank")
    args = ap.parse_args()
    if bool(args.model) != bool(args.bank):
        ap.error("give --model and --bank together")
    setup_threads()
    info = machine_info()
    model_path = Path(args.model) if args.model else default_model_path()
    model = load_model(model_path).prepare_for_inference()
    bank = MemoryBank.load(args.bank or default_bank_path(), model)
    data = fetch_pyradiomics_data(ROOT / "data")
    img = sitk.ReadImage(str(data / "lung2_image.nrrd"))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd")))
    k, j, i = np.argwhere(lab > 0).mean(0).round().astype(int)
    geom = Geometry.from_sitk(img)
    cfg = model.cfg
    crop = CropGrid.centred_on(geom.ijk_to_ras(np.array([i, j, k], float)), cfg.spacing_mm, cfg.encoder.img_size)
    x = normalize_crop(resample_to_crop(sitk.Cast(img, sitk.sitkFloat32), crop, cfg.pad_value), cfg.normalization)
    vol = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    with torch.inference_mode():
        plain, _ = median_time(lambda: model.encode(vol), args.repeats, warmup=2)
        provider = bank.provider()
        memory, _ = median_time(lambda: model.encode(vol, memory=provider), args.repeats, warmup=2)
    rng = np.random.default_rng(0)
    clicks = [
        ((float(i + rng.integers(-15, 16)), float(j + rng.integers(-15, 16)), float(k)), n % 3 != 2)
        for n in range(args.clicks + 1)
    ]
    first, times, paste = click_times(InteractiveSession(model, memory=bank), img, clicks)
    unrefined = SessionOptions(edge_refine=None)
    _, times_plain, paste_plain = click_times(InteractiveSession(model, unrefined, memory=bank), img, clicks)
    out = {
        "machine": info,
        "model": model_path.name,
        "config": cfg.name,
        "bank_entries": len(bank),
        "encoder_s": round(plain, 4),
        "encoder_with_bank_s": round(memory, 4),
        "first_click_ms": round(first, 1),
        "click_ms_p50": round(float(np.percentile(times, 50)), 2),
        "click_ms_p90": round(float(np.percentile(times, 90)), 2),
        "paste_ms_p50": round(float(np.percentile(paste, 50)), 2),
        "edge_refine": asdict(SessionOptions().edge_refine),
        "drop_islands": SessionOptions().drop_islands,
        "without_edge_refine": {
            "click_ms_p50": round(float(np.percentile(times_plain, 50)), 2),
            "click_ms_p90": round(float(np.percentile(times_plain, 90)), 2),
            "paste_ms_p50": round(float(np.percentile(paste_plain, 50)), 2),
        },
        "clicks": args.clicks,
    }
    emit(out, args.json)


def click_times(session: InteractiveSession, img: sitk.Image, clicks) -> tuple[float, list[float], list[float]]:
    """First click's time, then each refinement click's total and paste time (ms, as the session reports)."""
    session.set_image(img)
    session.add_segment()
    session.add_point(*clicks[0])
    first = session.last_timing["total_ms"]
    times, paste = [], []
    for c in clicks[1:]:
        session.add_point(*c)
        times.append(session.last_timing["total_ms"])
        paste.append(session.last_timing["paste_ms"])
    return first, times, paste


if __name__ == "__main__":
    main()
