"""Per-click round trip through the inference server on loopback, against the same click in process; with
--nginx also 8 clients x 20 clicks at once through nginx (deploy/nginx.conf, TLS) in front of 1 and of 2 servers.

    python benchmarks/bench_server.py --json --nginx > benchmarks/results_server.json

Starts ``memsam serve`` as a separate process on 127.0.0.1 (FastAPI + uvicorn), uploads the pyradiomics lung2 CT
once, then times --clicks refinement clicks (embedding cached) as seen by RemoteSession (request, server-side
decode + paste, compressed changed region back, applied to the client's mask copy), and the same clicks in an
in-process InteractiveSession. Model: the shipped default (or --model).
"""

from __future__ import annotations

import argparse
import os
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
from MemorizingSAMLib.server_process import NginxProcess, ServerProcess, free_port  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--model", default=None)
    ap.add_argument("--nginx", action="store_true", help="also 8 clients through nginx, 1 and 2 servers")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-clicks", type=int, default=20)
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
    if args.nginx:
        out["nginx"] = {
            f"{n}_servers": many_clients(model_path, img, clicks, n, args.clients, args.client_clicks) for n in (1, 2)
        }
    emit(out, args.json)


def many_clients(model_path, img, clicks, n_servers: int, n_clients: int, n_clicks: int) -> dict:
    """``n_clients`` threads, each its own session through nginx (TLS), clicking ``n_clicks`` refinement clicks
    as fast as answers come; per-click latency as each client sees it. The 2 cores are shared: with 2 servers
    each gets one model thread."""
    import subprocess
    import tempfile
    import threading

    tmp = Path(tempfile.mkdtemp())
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", tmp / "key.pem", "-out", tmp / "cert.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 1) // n_servers))
    common = ["--model", model_path, "--device", "cpu", "--threads", threads, "--max-sessions", "32"]
    servers = [ServerProcess([*common, "--max-sessions-per-user", "32"]).start() for _ in range(n_servers)]
    nginx = NginxProcess(
        ROOT / "deploy" / "nginx.conf", [s.port for s in servers], free_port(), tmp / "cert.pem", tmp / "key.pem"
    )
    latencies, errors, placed, recoveries = [], [], [], 0
    try:
        nginx.start()
        sessions = []
        for _ in range(n_clients):  # uploads and first encodes one after the other: the clicks are timed
            c = RemoteSession(nginx.url, ca_file=tmp / "cert.pem")
            c.set_image(img)
            c.add_segment()
            c.add_point(*clicks[0])
            sessions.append(c)
        counts = [RemoteSession(s.url).info()["sessions"] for s in servers]
        start = threading.Barrier(n_clients)

        def run(c):
            start.wait()
            for ck in clicks[1 : n_clicks + 1]:
                t = time.perf_counter()
                try:
                    c.add_point(*ck)
                    latencies.append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 (counted, not hidden)
                    errors.append(repr(e))

        t0 = time.perf_counter()
        workers = [threading.Thread(target=run, args=(c,)) for c in sessions]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        placed = [len(c.placed()) for c in sessions]
        recoveries = sum(c.recoveries for c in sessions)  # a routing fault would show here, not as errors
    finally:
        nginx.stop()
        for s in servers:
            s.stop()
    lat = np.array(latencies) * 1e3
    return {
        "servers": n_servers,
        "threads_per_server": int(threads),
        "clients": n_clients,
        "clicks_per_client": n_clicks,
        "sessions_per_server": counts,
        "click_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "click_ms_p90": round(float(np.percentile(lat, 90)), 1) if lat.size else None,
        "clicks_per_s": round(len(latencies) / wall, 1),
        "errors": len(errors),
        "error_examples": errors[:3],
        "prompts_placed": placed,
        "session_recoveries": recoveries,
    }


if __name__ == "__main__":
    main()
