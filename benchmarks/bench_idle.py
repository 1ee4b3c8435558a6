"""Why a click after idle is slower: the same refinement clicks with a pause before each, and an untimed treatment
between the pause and the click.

    python benchmarks/bench_idle.py --json > benchmarks/results_idle.json

Trained-decoder weights (lesion-sized masks), pyradiomics lung2 as in bench_session.py. Five conditions take turns
click by click (so the machine's drift hits them alike), each gets ``--clicks`` clicks:

- ``back_to_back``: no pause;
- ``pause``: ``--pause`` seconds of idle, then the click;
- ``pause_spin_main``: the pause, then 3 ms of busy-waiting on the calling thread only (wakes this vCPU);
- ``pause_touch``: the pause, then reading every decoder and prompt-encoder weight and the prepared embedding once
  (brings what the click reads back into the caches; torch's reductions use both threads);
- ``pause_spin_both``: the pause, then 3 ms of unrelated 256 x 256 products on both threads (wakes both vCPUs and
  fills the caches with other data).

Only the click is timed. If ``pause_touch`` recovers what ``pause`` loses, the penalty is the cost of reading what
went cold; if ``pause_spin_both`` does too, it is mostly the cores waking up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import MODEL_MASK, click_points, first_click, lung2_and_target  # noqa: E402
from common import emit, machine_info, setup_threads  # noqa: E402
from trained_decoder import trained_decoder_model  # noqa: E402

from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

SPIN_S = 0.003


def _spin_main() -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < SPIN_S:
        pass


def _touch(session: InteractiveSession) -> None:
    model = session.model
    for p in (*model.mask_decoder.parameters(), *model.prompt_encoder.parameters()):
        p.sum()
    prepared = session._embedding(session.segments[session.active].state.crop)
    for t in vars(prepared).values():
        if isinstance(t, torch.Tensor):
            t.sum()


def _spin_both(scratch: torch.Tensor) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < SPIN_S:
        scratch @ scratch


def run(args) -> dict:
    img, p0 = lung2_and_target()
    session, _ = first_click(trained_decoder_model(), img, p0, MODEL_MASK)
    scratch = torch.randn(256, 256)
    conditions = {
        "back_to_back": None,
        "pause": lambda: None,
        "pause_spin_main": _spin_main,
        "pause_touch": lambda: _touch(session),
        "pause_spin_both": lambda: _spin_both(scratch),
    }
    times: dict[str, list[float]] = {k: [] for k in conditions}
    names = list(conditions)
    for n, (p, include) in enumerate(click_points(img, p0, args.clicks) * len(names)):
        name = names[n % len(names)]
        if conditions[name] is not None:
            time.sleep(args.pause)
            conditions[name]()
        t = time.perf_counter()
        session.add_point(p, include)
        times[name].append((time.perf_counter() - t) * 1e3)
        if session.last_timing["encoded"]:
            raise RuntimeError("a click moved the crop: the clicks must stay in one crop")
    out = {"machine": machine_info(), "model": "fastsam3d, trained decoder", "pause_s": args.pause}
    base = float(np.median(times["back_to_back"]))
    for name, v in times.items():
        out[name] = {
            "click_ms_p50": round(float(np.median(v)), 2),
            "click_ms_p90": round(float(np.percentile(v, 90)), 2),
            "p50_over_back_to_back_ms": round(float(np.median(v)) - base, 2),
            "clicks": len(v),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clicks", type=int, default=30, help="clicks per condition")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle before each paused click")
    args = ap.parse_args()
    setup_threads()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
