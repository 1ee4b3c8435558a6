"""Per-click round trip through the inference server on loopback, against the same click in process.

    python benchmarks/bench_server.py --json

Starts ``memsam serve`` as a separate process on 127.0.0.1 (FastAPI + uvicorn), uploads the pyradiomics lung2 CT
once, then times --clicks refinement clicks (embedding cached) as seen by RemoteSession (request, server-side
decode + paste, compressed changed region back, applied to the client's mask copy), and the same clicks in an
in-process InteractiveSession. Model: the shipped default (or --model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, setup_threads  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model  # noqa: E402
from MemorizingSAMLib.client import RemoteSession  # noqa: E402
from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.resources import default_model_path  # noqa: E402
from MemorizingSAMLib.server_process import ServerProcess  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    setup_threads()
    model_path = args.model or str(default_model_path())
    data = fetch_pyradiomics_data(ROOT / "data")
    img = sitk.ReadImage(str(data / "lung2_image.nrrd"))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd")))
    k, j, i = np.argwhere(lab > 0).mean(0).round().astype(int)
    rng = np.random.default_rng(0)
    clicks = [
        ((float(i + rng.integers(-15, 16)), float(j + rng.integers(-15, 16)), float(k)), n % 3 != 2)
        for n in range(args.clicks + 1)
    ]
    server = ServerProcess(["--model", model_path, "--device", "cpu"]).start()
    url = server.url
    try:
        remote = RemoteSession(url)
        remote.set_image(img)
        remote.add_segment()
        remote.add_point(*clicks[0])  # encodes
        rt = []
        for c in clicks[1:]:
            t = time.perf_counter()
            remote.add_point(*c)
            rt.append(time.perf_counter() - t)
        remote_mask = remote.mask().copy()
        remote.close()
    finally:
        server.stop()
    local = InteractiveSession(load_model(model_path).prepare_for_inference())
    local.set_image(img)
    local.add_segment()
    local.add_point(*clicks[0])
    lt = []
    for c in clicks[1:]:
        t = time.perf_counter()
        local.add_point(*c)
        lt.append(time.perf_counter() - t)
    out = {
        "machine": machine_info(),
        "model": Path(model_path).name,
        "clicks": args.clicks,
        "roundtrip_ms_p50": round(float(np.median(rt)) * 1e3, 2),
        "inprocess_ms_p50": round(float(np.median(lt)) * 1e3, 2),
        "overhead_ms_p50": round(float(np.median(rt) - np.median(lt)) * 1e3, 2),
        "final_masks_identical": bool(np.array_equal(remote_mask, local.mask())),
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
