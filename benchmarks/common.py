"""Helpers shared by the benchmark scripts: thread setup, timing, recipe-weight models."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from MemorizingSAMLib.capabilities import capabilities

COMPAT_DIR = Path(__file__).resolve().parent.parent / "Testing" / "Data" / "compat"


def setup_threads() -> int:
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def calibration_gflops() -> float:
    """fp32 GEMM throughput right now (512x768 @ 768x3072, median of 20): shared machines vary by 2x over
    minutes, so every benchmark records it next to its figures."""
    a, b = torch.randn(512, 768), torch.randn(3072, 768)
    t, _ = median_time(lambda: torch.nn.functional.linear(a, b), repeats=20, warmup=3)
    return round(2 * 512 * 768 * 3072 / t / 1e9, 1)


def machine_info() -> dict:
    caps = capabilities()
    return {
        "cpu": caps.cpu,
        "cpu_flags": list(caps.flags),
        "aten_isa": caps.aten_isa,
        "onednn_bf16": caps.onednn_bf16,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "calibration_gemm_gflops": calibration_gflops(),
    }


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time in seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def recipe_model(config_name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A published-architecture model with the deterministic fixture weights (salt 'a'): realistic activations."""
    from MemorizingSAMLib.compat_recipe import recipe_tensor
    from MemorizingSAMLib.modeling import build_sam3d
    from MemorizingSAMLib.modeling.sam3d import Sam3D

    with torch.device("meta"):
        model: Sam3D = build_sam3d(config_name)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # one float64 tensor at a time, so the benchmark's peak RSS is not the recipe's
    sd = {k: torch.from_numpy(recipe_tensor(k, s, "a")).to(dtype) for k, s in shapes.items()}
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval().prepare_for_inference()


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
