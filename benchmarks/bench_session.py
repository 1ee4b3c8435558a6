"""Click latency of InteractiveSession on a real CT (pyradiomics 3.0.1 data/lung2: 512x512x61, 0.63x0.63x5 mm).

    python benchmarks/bench_session.py --json

FastSAM3D architecture with the fixture-recipe weights (timing only: their masks cover ~half the crop, which is
the worst case for the paste). First click on the tumour's interior-most voxel; time to first mask = that click
with an empty cache (crop, encode, decode, paste); then --clicks refinement clicks inside the same crop (embedding
cached), alternating include/exclude, each timed end to end (decode + paste into the 512x512x61 mask).
``--large`` also runs a 1024^3 uint8 volume and reports its peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, recipe_model, setup_threads  # noqa: E402

from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interior_point(label: np.ndarray) -> np.ndarray:
    """(i, j, k) of the voxel farthest from the label's border."""
    dt = ndimage.distance_transform_edt(label > 0)
    k, j, i = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return np.array([i, j, k], dtype=np.float64)


def run(args) -> dict:
    data = fetch_pyradiomics_data(ROOT / "data")
    model = recipe_model("fastsam3d")
    img = sitk.ReadImage(str(data / "lung2_image.nrrd"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd")))
    session = InteractiveSession(model)
    session.set_image(img)
    session.add_segment("tumour")
    p0 = interior_point(label)
    t = time.perf_counter()
    session.add_point(p0)
    first = time.perf_counter() - t
    rng = np.random.default_rng(0)
    times, model_ms, paste_ms, encoded, region_vox = [], [], [], 0, []
    for n in range(args.clicks):
        # within +-30 voxels in-plane (19 mm) and +-2 slices: stays inside the 192 mm crop
        off = np.array([rng.integers(-30, 31), rng.integers(-30, 31), rng.integers(-2, 3)], dtype=np.float64)
        p = np.clip(p0 + off, 0, np.array(img.GetSize()) - 1)
        t = time.perf_counter()
        region = session.add_point(p, include=n % 3 != 2)
        times.append(time.perf_counter() - t)
        model_ms.append(session.last_timing["model_ms"])
        paste_ms.append(session.last_timing["paste_ms"])
        encoded += session.last_timing["encoded"]
        region_vox.append(region.voxels if region else 0)
    ms = np.array(times) * 1e3
    out = {
        "machine": machine_info(),
        "image": "pyradiomics-3.0.1 data/lung2_image.nrrd (512x512x61, 0.63x0.63x5 mm)",
        "model": "fastsam3d (recipe weights)",
        "clicks": args.clicks,
        "first_mask_s": round(first, 4),
        "click_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "click_ms_p90": round(float(np.percentile(ms, 90)), 2),
        "click_model_ms_p50": round(float(np.median(model_ms)), 2),
        "click_paste_ms_p50": round(float(np.median(paste_ms)), 2),
        "changed_region_voxels_median": int(np.median(region_vox)),
        "re_encodes_during_clicks": int(encoded),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if args.large:
        out.update(run_large(model))
    return out


def run_large(model) -> dict:
    base = peak_rss_mb()
    vol = np.zeros((1024, 1024, 1024), dtype=np.uint8)
    vol[400:600, 400:600, 400:600] = 200
    vol[::7] += 10  # not constant anywhere
    after_array = peak_rss_mb()
    s = InteractiveSession(model)
    s.set_image(vol, spacing=(0.5, 0.5, 0.5))
    s.add_segment()
    t = time.perf_counter()
    s.add_point((500, 500, 500))
    first = time.perf_counter() - t
    return {
        "large_volume": "1024^3 uint8, 0.5 mm",
        "large_first_mask_s": round(first, 3),
        "large_array_mb": round(vol.nbytes / 2**20, 1),
        "large_rss_before_array_mb": round(base, 1),
        "large_rss_with_array_mb": round(after_array, 1),
        "large_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--large", action="store_true", help="also time a 1024^3 uint8 volume (needs ~3 GB)")
    args = ap.parse_args()
    setup_threads()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
