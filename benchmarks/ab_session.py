"""A/B click latency of this working tree against another git revision, in one process, on the same model.

    python benchmarks/ab_session.py --ref f099b10 --clicks 60 --json

This machine's speed drifts by 1.5x within minutes, so two benchmark runs minutes apart cannot compare two
versions of the click path. Here both versions run in the same process on the same model (recipe-weight FastSAM3D)
and the same lung2 clicks as bench_session.py, alternating click by click (the order flipped every click), and the
final masks must agree byte for byte. The other revision's MemorizingSAMLib is taken with ``git archive`` into a
temporary directory under another package name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import lung2_and_target  # noqa: E402
from common import emit, machine_info, recipe_model, setup_threads  # noqa: E402

from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def import_revision(ref: str, into: Path):
    """MemorizingSAMLib at git ``ref`` as the package ``memsam_ref`` (its session module)."""
    tar = subprocess.run(["git", "archive", ref, "MemorizingSAMLib"], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as t:
        t.extractall(into, filter="data")
    (into / "MemorizingSAMLib").rename(into / "memsam_ref")
    sys.path.insert(0, str(into))
    from memsam_ref.session import InteractiveSession as RefSession

    return RefSession


def run(args) -> dict:
    img, p0 = lung2_and_target()
    model = recipe_model("fastsam3d")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {args.ref: import_revision(args.ref, Path(tmp))(model), "working tree": InteractiveSession(model)}
        for s in sessions.values():
            s.set_image(img)
            s.add_segment("tumour")
            s.add_point(p0)
        rng = np.random.default_rng(0)
        times = {k: [] for k in sessions}
        for n in range(args.clicks + args.warmup):
            off = np.array([rng.integers(-30, 31), rng.integers(-30, 31), rng.integers(-2, 3)], dtype=np.float64)
            p = np.clip(p0 + off, 0, np.array(img.GetSize()) - 1)
            order = list(sessions.items())
            for name, s in order if n % 2 else order[::-1]:
                t = time.perf_counter()
                s.add_point(p, include=n % 3 != 2)
                dt = time.perf_counter() - t
                if n >= args.warmup:
                    times[name].append((dt * 1e3, s.last_timing["model_ms"], s.last_timing["paste_ms"]))
        masks = [s.mask() for s in sessions.values()]
        same = bool(np.array_equal(masks[0], masks[1]))
    out = {"machine": machine_info(), "clicks": args.clicks, "masks_identical": same}
    for name, v in times.items():
        a = np.array(v)
        out[name] = {
            "click_ms_p50": round(float(np.median(a[:, 0])), 2),
            "click_ms_p90": round(float(np.percentile(a[:, 0], 90)), 2),
            "model_ms_p50": round(float(np.median(a[:, 1])), 2),
            "paste_ms_p50": round(float(np.median(a[:, 2])), 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="git revision to compare against (e.g. a commit hash)")
    ap.add_argument("--clicks", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    setup_threads()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
