"""Memory-bank retrieval time and the FastSAM3D encoder's cost of memory attention.

    python benchmarks/bench_memory.py --json

Retrieval: exact top-3 over N = 100, 1 000, 10 000 descriptors (the real descriptor size, 256, unit norm),
median of 200 queries, including the read of the 3 retrieved entries' keys/values from the memory-mapped file.
Encoder: FastSAM3D with recipe weights, 128^3, median of --repeats runs, without memory and with a bank of real
entries (k = 3, memory layer 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, median_time, recipe_model, setup_threads  # noqa: E402

from MemorizingSAMLib.compat_recipe import recipe_volume  # noqa: E402
from MemorizingSAMLib.memory_bank import BankEntry, MemoryBank, write_bank  # noqa: E402
from MemorizingSAMLib.modeling.memory_attention import DESCRIPTOR_DIM  # noqa: E402


def synthetic_bank(model, n: int, folder: Path, with_kv_from=None) -> Path:
    rng = np.random.default_rng(n)
    enc = model.image_encoder
    d = DESCRIPTOR_DIM
    desc = rng.normal(size=(n, d)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    h, hd = enc.cfg.num_heads, enc.cfg.head_dim
    # keys/values of real size for every entry (1.5 MB each in fp16); the file is sparse where they are zero
    kv_shape = (n, h, enc.cfg.grid**3, hd)
    keys = np.lib.format.open_memmap(folder / f"k{n}.npy", "w+", np.float16, kv_shape)
    vals = np.lib.format.open_memmap(folder / f"v{n}.npy", "w+", np.float16, kv_shape)
    if with_kv_from is not None:
        k, v = with_kv_from
        for i in range(n):
            keys[i], vals[i] = k, v
    entries = [BankEntry("synthetic", 1, f"s{i}", (0.0, 0.0, 0.0), 1) for i in range(n)]
    return write_bank(folder / f"bank{n}.msam", model, 4, desc, keys, vals, entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    setup_threads()
    model = recipe_model("fastsam3d")
    out = {"machine": machine_info()}
    vol = torch.from_numpy(recipe_volume("a")).float()[None, None]
    with torch.inference_mode():
        k, v, d = model.image_encoder.memory_entry(vol, 4)
    kv = (k[0].half().numpy(), v[0].half().numpy())
    with tempfile.TemporaryDirectory() as tmp:
        for n in (100, 1000, 10000):
            bank = MemoryBank.load(synthetic_bank(model, n, Path(tmp)), k=3)
            q = torch.randn(DESCRIPTOR_DIM)
            bank.nearest(q)
            times = []
            for _ in range(200):
                q = torch.nn.functional.normalize(torch.randn_like(q), dim=0)
                t = time.perf_counter()
                idx, _ = bank.nearest(q)
                times.append(time.perf_counter() - t)
            out[f"retrieval_ms_{n // 1000}k" if n >= 1000 else f"retrieval_ms_{n}"] = round(
                statistics.median(times) * 1e3, 4
            )
            t_read = []
            for _ in range(20):
                t = time.perf_counter()
                bank.retrieve_entries(idx)
                t_read.append(time.perf_counter() - t)
            out[f"read_kv_k3_ms_n{n}"] = round(statistics.median(t_read) * 1e3, 3)
        bank = MemoryBank.load(synthetic_bank(model, 8, Path(tmp), with_kv_from=kv), model, k=3)
        with torch.inference_mode():
            plain, _ = median_time(lambda: model.encode(vol), args.repeats)
            prov = bank.provider()
            mem, _ = median_time(lambda: model.encode(vol, memory=prov), args.repeats)
            changed = (model.encode(vol, memory=prov) - model.encode(vol)).abs().max().item()
    out["encoder_s"] = round(plain, 4)
    out["encoder_with_memory_s"] = round(mem, 4)
    out["memory_overhead_ratio"] = round(mem / plain, 3)
    out["embedding_max_abs_change_with_memory"] = round(changed, 4)
    emit(out, args.json)


if __name__ == "__main__":
    main()
