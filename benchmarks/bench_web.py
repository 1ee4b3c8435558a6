"""Click-to-overlay latency of the web app (``memsam web``), measured in the browser: a real ``memsam web`` process
(the shipped default model with its bank, in the app's process) and Debian's Chromium headless, 1400x900.

A click is timed in the page, from its pointerdown (Chromium's input pipeline, driven through WebDriver) to the
load of the first axial-view frame that shows the segment changed (its overlay-coloured pixel count, away from the
click's own glyph, moved by >= 20 pixels) among the frames that arrive after the app's state says the result was
written. That spans the event to the server, Slicer's markups widget placing the point, the module's logic, the
decode, the write into the segmentation, the re-render of the views (off-screen Mesa) and the JPEG frame back.
The server's own share (markups event to segment written, SegmentationLogic.last_latency_ms) is reported beside.

Each repeat resets the segment and clicks the lung2 sample's lesion ``--clicks`` times where a user looking at the
screen would (the first at the lesion's deepest point on screen, then the deepest point of the larger error).
The first click of the first repeat also encodes (and warms up) and is reported apart.

    .venv/bin/python benchmarks/bench_web.py --json > benchmarks/results_web.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "Testing")]

import browser  # noqa: E402
from common import emit, machine_info  # noqa: E402

from MemorizingSAMLib.server_process import ServerProcess  # noqa: E402

LABEL = ROOT / "Resources" / "SampleData" / "lung2_crop_label.nii.gz"


def percentile(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--clicks", type=int, default=3, help="clicks per repeat")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--app-arg", action="append", default=[], help="an extra argument for memsam web")
    args = ap.parse_args()

    rows, first = [], None
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerProcess(args.app_arg, command="web", probe="/", startup_s=120) as app,
    ):
        d = browser.start_chromium(Path(tmp))
        try:
            d.get(app.url + "/")
            browser.wait_until(lambda: browser.state(d, "model_ready"), 120, "the model")
            browser.element(d, "open-sample-lung2_crop").click()
            browser.wait_until(lambda: browser.state(d, "segments"), 60, "the lung sample")
            img = browser.view_image(d, "Red")
            geo = browser.ViewGeometry(browser.settled_frame(d, img), LABEL)
            for r in range(args.repeats):
                if r:
                    n = browser.state(d, "results")
                    browser.element(d, "reset").click()
                    browser.wait_until(lambda n=n: browser.state(d, "results") > n, 30, "the reset")
                for c in range(args.clicks):
                    shown = browser.overlay(browser.settled_frame(d, img)) & geo.volume
                    kind, xy = ("include", geo.deepest(geo.lesion)) if c == 0 else geo.next_click(shown)
                    if browser.state(d, "tool") != kind:
                        browser.element(d, f"tool-{kind}").click()
                        browser.wait_until(lambda k=kind: browser.state(d, "tool") == k, 10, "the tool")
                    n = browser.state(d, "results")
                    browser.watch_overlay(d, img, click=xy, results=n + 1)
                    browser.click_at(d, img, *xy)
                    browser.wait_until(lambda n=n: browser.state(d, "results") > n, 60, "the click's result")
                    try:
                        ms = browser.overlay_latency_ms(d, timeout=5)
                    except TimeoutError:
                        ms = None  # the segment did not change visibly in the axial view
                    row = {
                        "repeat": r,
                        "click": c + 1,
                        "kind": kind,
                        "browser_ms": None if ms is None else round(ms, 1),
                        "server_ms": browser.state(d, "latency_ms"),
                        "decodes": browser.state(d, "decodes"),
                        "server_breakdown_ms": browser.state(d, "latency_breakdown"),
                    }
                    if r == 0 and c == 0:
                        first = row
                    else:
                        rows.append(row)
                    time.sleep(0.3)
            d.save_screenshot(str(Path(tmp) / "last.png"))
        finally:
            d.quit()

    seen = [x["browser_ms"] for x in rows if x["browser_ms"] is not None]
    server = [x["server_ms"] for x in rows if x["server_ms"] is not None]
    result = {
        "benchmark": "web click-to-overlay in Chromium (memsam web, lung2 sample, axial view)",
        "machine": machine_info(),
        "clicks_timed": len(rows),
        "clicks_without_visible_change": sum(x["browser_ms"] is None for x in rows),
        "browser_click_to_overlay_ms": {"p50": percentile(seen, 50), "p90": percentile(seen, 90)},
        "server_event_to_segment_ms": {"p50": percentile(server, 50), "p90": percentile(server, 90)},
        "decodes_per_click": sorted({x["decodes"] for x in rows}),
        "first_click_with_encode": first,
        "rows": rows,
        "mean_browser_ms": round(statistics.fmean(seen), 1) if seen else None,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
