"""Click latency of InteractiveSession on a real CT (pyradiomics 3.0.1 data/lung2: 512x512x61, 0.63x0.63x5 mm).

    python benchmarks/bench_session.py --json --variants --large

FastSAM3D architecture with the fixture-recipe weights (timing only: their masks cover ~half the crop, which is
the worst case for the paste). First click on the tumour's interior-most voxel; time to first mask = that click
with an empty cache (crop, encode, decode, paste); then --clicks refinement clicks inside the same crop (embedding
cached), include, include, exclude, ..., each timed end to end (decode + paste into the 512x512x61 mask).
``--variants`` then repeats the clicks with weights whose masks have a lesion's extent (the recipe model with its
decoder trained briefly, trained_decoder.py) and compares exact with the opt-in bf16 products (see variants()).
``--large`` also runs a 1024^3 uint8 volume and reports its peak RSS. ``--repeat R`` then clicks the same clicks
R more times, ``--interval`` seconds apart, each time with the GEMM calibration measured first: this machine's
speed drifts by up to 1.7x over minutes, and one run samples one phase (see repeats()). ``--paced S`` clicks them
once more with S seconds of idle before each click, as a user clicks (back-to-back clicks find warm caches and
busy threads; see paced()).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibration_gflops, emit, machine_info, recipe_model, setup_threads  # noqa: E402
from trained_decoder import trained_decoder_model  # noqa: E402

from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession, SessionOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def interior_point(label: np.ndarray) -> np.ndarray:
    """(i, j, k) of the voxel farthest from the label's border."""
    dt = ndimage.distance_transform_edt(label > 0)
    k, j, i = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return np.array([i, j, k], dtype=np.float64)


def lung2_and_target() -> tuple[sitk.Image, np.ndarray]:
    """The benchmark CT and its first click (the lesion's interior-most voxel, ijk), for the A/B scripts."""
    data = fetch_pyradiomics_data(ROOT / "data")
    p0 = interior_point(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd"))))
    return sitk.ReadImage(str(data / "lung2_image.nrrd")), p0


# The click path as the model gives it (decode + paste), without the session's edge refinement: the recipe weights'
# masks cover half the crop and follow no anatomy, and the refinement's cost follows the refined region's volume
# (~30 ns per voxel here: ~85 ms on such a 2.9M-voxel mask, 3-8 ms on the shipped model's lesion masks). The
# refinement is timed on real masks by bench_default_model.py and, as the module runs it, by bench_slicer.py.
MODEL_MASK = SessionOptions(edge_refine=None)


def run(args) -> dict:
    data = fetch_pyradiomics_data(ROOT / "data")
    # the click target first (its distance transform is the benchmark's, not the session's, memory)
    p0 = interior_point(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd"))))
    model = recipe_model("fastsam3d")
    rss_model = current_rss_mb()
    img = sitk.ReadImage(str(data / "lung2_image.nrrd"))
    out = {
        "machine": machine_info(),
        "image": "pyradiomics-3.0.1 data/lung2_image.nrrd (512x512x61, 0.63x0.63x5 mm)",
        "model": "fastsam3d (recipe weights)",
        "clicks": args.clicks,
        "edge_refine": None,
    }
    session, first = click_run(model, img, p0, args.clicks, MODEL_MASK, out)
    out.update(
        {
            "first_mask_s": round(first, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_after_model_load_mb": round(rss_model, 1),
            "rss_after_clicks_mb": round(current_rss_mb(), 1),
        }
    )
    out.update(paste_small_region(session, p0))
    del session
    if args.large:  # before the variants, which load a second model (peak RSS is a high-water mark)
        out.update(run_large(model))
    trained = trained_decoder_model() if args.variants else None
    if args.variants:
        out["variants"] = variants(model, trained, img, p0, args.clicks)
    if args.repeat:
        out["repeats"] = repeats(model, trained, img, p0, args.clicks, args.repeat, args.interval)
    if args.paced:
        out["paced"] = paced(model, trained, img, p0, args.clicks, args.paced)
    return out


def click_points(img, p0: np.ndarray, clicks: int) -> list[tuple[np.ndarray, bool]]:
    """The refinement clicks: within +-30 voxels in-plane (19 mm) and +-2 slices of the first (inside the 192 mm
    crop), include, include, exclude, ..."""
    rng = np.random.default_rng(0)
    out = []
    for n in range(clicks):
        off = np.array([rng.integers(-30, 31), rng.integers(-30, 31), rng.integers(-2, 3)], dtype=np.float64)
        out.append((np.clip(p0 + off, 0, np.array(img.GetSize()) - 1), n % 3 != 2))
    return out


def first_click(model, img, p0, options: SessionOptions) -> tuple[InteractiveSession, float]:
    """A new session on ``img`` with one segment and its first click at ``p0``; returns it and that click's time (s,
    empty embedding cache: crop, encode, prepare, decode, paste)."""
    session = InteractiveSession(model, options)
    session.set_image(img)
    session.add_segment("tumour")
    t = time.perf_counter()
    session.add_point(p0)
    return session, time.perf_counter() - t


def click_run(model, img, p0, clicks: int, options: SessionOptions, out: dict) -> tuple[InteractiveSession, float]:
    """First click (empty cache), then ``clicks`` refinement clicks in the same crop; per-click figures into
    ``out``. Returns the session and the time to first mask (s)."""
    session, first = first_click(model, img, p0, options)
    rec = Record()
    for p, include in click_points(img, p0, clicks):
        rec.click(session, p, include)
    out.update(rec.summary(session))
    return session, first


class Record:
    """Per-click timings of one session."""

    def __init__(self) -> None:
        self.ms, self.model_ms, self.paste_ms, self.region_vox, self.encoded = [], [], [], [], 0

    def click(self, session: InteractiveSession, p: np.ndarray, include: bool) -> None:
        t = time.perf_counter()
        region = session.add_point(p, include=include)
        self.ms.append((time.perf_counter() - t) * 1e3)
        self.model_ms.append(session.last_timing["model_ms"])
        self.paste_ms.append(session.last_timing["paste_ms"])
        self.encoded += session.last_timing["encoded"]
        self.region_vox.append(region.voxels if region else 0)

    def summary(self, session: InteractiveSession) -> dict:
        return {
            "click_ms_p50": round(float(np.percentile(self.ms, 50)), 2),
            "click_ms_p90": round(float(np.percentile(self.ms, 90)), 2),
            "click_model_ms_p50": round(float(np.median(self.model_ms)), 2),
            "click_paste_ms_p50": round(float(np.median(self.paste_ms)), 2),
            "changed_region_voxels_median": int(np.median(self.region_vox)),
            "final_mask_voxels": int(session.mask().sum()),
            "re_encodes_during_clicks": int(self.encoded),
        }


def timed_clicks(session: InteractiveSession, img, p0, clicks: int, pause_s: float = 0.0) -> dict:
    """The refinement clicks in ``session`` (``pause_s`` of idle before each): their timing figures."""
    rec = Record()
    for p, include in click_points(img, p0, clicks):
        if pause_s:
            time.sleep(pause_s)
        rec.click(session, p, include)
    return {k: v for k, v in rec.summary(session).items() if k.startswith("click_")}


def by_name(recipe, trained) -> dict:
    """The models of the extra runs: the recipe's, and the trained decoder's with --variants."""
    return {"recipe": recipe} if trained is None else {"recipe": recipe, "trained_decoder": trained}


def variants(recipe, trained, img, p0, clicks: int) -> dict:
    """The clicks again with weights whose masks have a lesion's extent (the recipe model with its decoder trained
    briefly, trained_decoder.py), alone in its session like the main run; then, for both sets of weights, exact vs
    the opt-in bf16 products as an A/B: two sessions of the same model clicked in turn, click by click (this
    machine's speed drifts within seconds, so runs one after the other would compare phases), with the Dice of the
    two final masks."""
    out: dict = {"trained_decoder": {}}
    _, first = click_run(trained, img, p0, clicks, MODEL_MASK, out["trained_decoder"])
    out["trained_decoder"]["first_mask_s"] = round(first, 4)
    for name, model in (("recipe", recipe), ("trained_decoder", trained)):
        out[f"ab_bf16_products_{name}"] = paired(model, img, p0, clicks)
    return out


def repeats(recipe, trained, img, p0, clicks: int, n: int, interval_s: float, target_ms: float = 15.0) -> dict:
    """``n`` more runs of the refinement clicks, ``interval_s`` apart, each after a GEMM calibration; with
    ``trained`` (--variants) its session's clicks follow the recipe's in each run (in a block, as a user works with
    one model: clicked in turn, each decode would start with the other model's weights in the caches). Per run:
    p50/p90 and the model/paste split; over runs: median, range and how many runs had a p50 within ``target_ms``."""
    sessions = {name: first_click(m, img, p0, MODEL_MASK)[0] for name, m in by_name(recipe, trained).items()}
    runs = []
    for r in range(n):
        if r:
            time.sleep(interval_s)
        row: dict = {"calibration_gemm_gflops": calibration_gflops()}
        for name, s in sessions.items():
            row[name] = timed_clicks(s, img, p0, clicks)
        runs.append(row)
    out: dict = {"interval_s": interval_s, "runs": runs}
    for name in sessions:
        p50 = [row[name]["click_ms_p50"] for row in runs]
        p90 = [row[name]["click_ms_p90"] for row in runs]
        out[name] = {
            "click_ms_p50_median": round(float(np.median(p50)), 2),
            "click_ms_p50_min": min(p50),
            "click_ms_p50_max": max(p50),
            "click_ms_p90_median": round(float(np.median(p90)), 2),
            f"runs_with_p50_within_{target_ms:g}_ms": sum(v <= target_ms for v in p50),
            "runs": len(p50),
        }
    cal = [row["calibration_gemm_gflops"] for row in runs]
    out["calibration_gemm_gflops_range"] = [min(cal), max(cal)]
    return out


def paced(recipe, trained, img, p0, clicks: int, pause_s: float) -> dict:
    """The refinement clicks with ``pause_s`` of idle before each (a person clicks every second or two): per model, in
    its own session, the same figures as the main run."""
    out: dict = {"pause_s": pause_s}
    for name, m in by_name(recipe, trained).items():
        out[name] = timed_clicks(first_click(m, img, p0, MODEL_MASK)[0], img, p0, clicks, pause_s)
    return out


def paired(model, img, p0, clicks: int) -> dict:
    setups = {"exact": MODEL_MASK, "bf16_products": replace(MODEL_MASK, product_dtype="bfloat16")}
    sessions, records = {}, {}
    for name, options in setups.items():
        sessions[name], _ = first_click(model, img, p0, options)
        records[name] = Record()
    for p, include in click_points(img, p0, clicks):
        for name, s in sessions.items():
            records[name].click(s, p, include)
    out = {name: records[name].summary(s) for name, s in sessions.items()}
    a, b = (sessions[n].mask().astype(bool) for n in setups)
    out["final_mask_dice"] = round(float(2 * (a & b).sum() / max(1, a.sum() + b.sum())), 5)
    out["final_mask_voxels_differing"] = int((a != b).sum())
    return out


def paste_small_region(session: InteractiveSession, p0: np.ndarray) -> dict:
    """Paste time for a lesion-sized result: low-res logits of a 20 mm radius sphere at the first click (what a
    trained model returns for a small tumour), written with the same code path as a click."""
    seg = session.segments[session.active]
    crop = seg.state.crop
    c = (np.arange(32) + 0.5) * 4 - 0.5
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    centre = crop.ras_to_crop(session.geometry.ijk_to_ras(p0))
    dist = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) * crop.spacing
    import torch

    low = torch.from_numpy((20.0 - dist).astype(np.float32))[None, None]
    times, voxels = [], 0
    session.reset()
    seg = session.segments[session.active]
    for n in range(31):
        lo = low + (2.0 if n % 2 else 0.0)  # radius 20 / 22 mm alternately: every paste changes the mask
        state = type(seg.state)(crop=crop, prompts=seg.state.prompts, low_res=lo, last_region=seg.state.last_region)
        t = time.perf_counter()
        region = session._commit(seg, seg.state, state, lo)
        if n:  # the first one also clears the reset segment's state
            times.append(time.perf_counter() - t)
            voxels = max(voxels, region.voxels if region else 0)
    return {"paste_ms_p50_lesion_20mm": round(float(np.median(times)) * 1e3, 2), "lesion_region_voxels": voxels}


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
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also run the clicks with bf16 products and with trained-decoder weights (trains them first if not "
        "cached in data/bench/, ~5 min)",
    )
    ap.add_argument("--repeat", type=int, default=0, help="this many more runs of the clicks (see repeats())")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between --repeat runs")
    ap.add_argument("--paced", type=float, default=0.0, help="also click with this many seconds of idle before each")
    args = ap.parse_args()
    if args.repeat < 0 or args.interval < 0 or args.paced < 0:
        ap.error("--repeat, --interval and --paced must not be negative")
    setup_threads()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
