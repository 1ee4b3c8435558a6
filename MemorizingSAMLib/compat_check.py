"""Run the scenarios of the compatibility fixtures (shared/compat/SPEC.md section 3) and compare with them.

Used by the test suite and by ``benchmarks/compat_report.py``; a user with a GPU can run the same comparison
there. Everything here works on one fixture file (``sammed3d_a.npz`` ...) plus the shapes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .compat_recipe import recipe_state_dict, recipe_volume
from .fileio import atomic_write
from .modeling.sam3d import Sam3D

SHAPES_FILES = {"sammed3d": "shapes_sammed3d_vit_b.json", "fastsam3d": "shapes_fastsam3d_full_student.json"}
CONFIG_NAMES = {"sammed3d": "sam_med3d_vit_b", "fastsam3d": "fastsam3d"}


def fixture_identity(npz_path: Path) -> tuple[str, str]:
    """(model family 'sammed3d'|'fastsam3d', variant salt) of a fixture file, from its own metadata."""
    with np.load(npz_path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
    model = str(meta.get("model", npz_path.stem.rsplit("_", 1)[0])).lower().replace("-", "").replace("_", "")
    family = "fastsam3d" if "fast" in model else "sammed3d"
    return family, str(meta.get("variant", npz_path.stem.rsplit("_", 1)[1]))


def write_upstream_checkpoint(npz_path: Path, out_path: Path) -> Path:
    """Regenerate the fixture weights (float64) and save them in the upstream training-file container, including
    the pickled ``argparse.Namespace`` that upstream stores as ``args``."""
    family, salt = fixture_identity(npz_path)
    shapes = json.loads((npz_path.parent / SHAPES_FILES[family]).read_text())
    sd = {k: torch.from_numpy(v) for k, v in recipe_state_dict(shapes, salt).items()}
    container = {
        "epoch": 0,
        "model_state_dict": sd,
        "args": argparse.Namespace(task_name="compat", model_type="vit_b_ori", lr=8e-4),
        "losses": [0.5],
        "best_loss": 0.5,
    }
    atomic_write(out_path, lambda f: torch.save(container, f))
    return out_path


def checksum(t: torch.Tensor) -> np.ndarray:
    """[sum t, sum t^2, sum t * ((i mod 97) - 48)] over the C-order flattening, in float64."""
    x = t.detach().to(torch.float64).reshape(-1).cpu()
    w = (torch.arange(x.numel(), dtype=torch.float64) % 97) - 48
    return np.array([x.sum().item(), (x * x).sum().item(), (x * w).sum().item()])


@torch.no_grad()
def run_scenarios(model: Sam3D, npz_path: Path) -> dict[str, np.ndarray]:
    """Our outputs for everything the fixture stores, computed in the model's dtype on its device."""
    p = next(model.parameters())
    dtype, device = p.dtype, p.device
    z = np.load(npz_path, allow_pickle=False)
    _, salt = fixture_identity(npz_path)
    vol = torch.from_numpy(recipe_volume(salt)).to(device=device, dtype=dtype)[None, None]
    enc = model.image_encoder
    emb, blocks = enc(vol, return_block_outputs=True)
    out: dict[str, np.ndarray] = {}

    def npy(t):
        return t.detach().to(torch.float64).cpu().numpy()

    out["image_embedding"] = npy(emb)
    out["image_embedding_checksum"] = checksum(emb)
    out["encoder_block_checksum"] = np.stack([checksum(b) for b in blocks])
    if "encoder_stage_checksum" in z.files:
        stages = [enc.embed(vol), blocks[1], blocks[3], blocks[5]]
        out["encoder_stage_checksum"] = np.stack([checksum(s) for s in stages] + [checksum(emb)])
        out["encoder_stages_c0_64"] = np.stack([npy(s[..., :64]) for s in stages])
    pe = model.prompt_encoder.get_dense_pe()
    out["dense_pe"] = npy(pe)
    out["dense_pe_checksum"] = checksum(pe)

    def prompts(name):
        return (
            torch.from_numpy(z[f"points_{name}"]).to(device),
            torch.from_numpy(z[f"labels_{name}"]).to(device),
        )

    lr = model.low_res_size
    zeros = torch.zeros(1, 1, lr, lr, lr, dtype=dtype, device=device)
    scenarios = {
        "S1": ("p1", None, False),
        "S2": ("p2", "S1", False),
        "S3": ("p12", "S1", False),
        "S4": ("p1", None, True),
    }
    for sid, (pname, mask_from, mm) in scenarios.items():
        mask = zeros if mask_from is None else torch.from_numpy(out[f"{mask_from}_lowres"]).to(device, dtype)
        sparse, dense = model.prompt_encoder(prompts(pname), None, mask)
        low, iou = model.mask_decoder(emb, pe, sparse, dense, mm)
        out[f"{sid}_sparse"] = npy(sparse)
        out[f"{sid}_dense_checksum"] = checksum(dense)
        if sid == "S1":
            out["S1_dense"] = npy(dense)
            up = F.interpolate(low, size=(enc.cfg.img_size,) * 3, mode="trilinear", align_corners=False) > 0
            out["S1_mask128"] = up.cpu().numpy().reshape(-1)
        out[f"{sid}_lowres"] = npy(low)
        out[f"{sid}_iou"] = npy(iou)
    return out


@dataclass
class Comparison:
    """Max abs differences per fixture array, relative differences for checksums, flipped voxels of the mask."""

    abs_diff: dict[str, float] = field(default_factory=dict)
    rel_checksum_diff: dict[str, float] = field(default_factory=dict)
    mask_flipped: int = 0
    f32_arrays_abs_diff: dict[str, float] = field(default_factory=dict)

    def worst(self, prefixes: tuple[str, ...]) -> float:
        vals = [v for k, v in self.abs_diff.items() if k.startswith(prefixes)]
        return max(vals) if vals else 0.0


def compare(ours: dict[str, np.ndarray], npz_path: Path) -> Comparison:
    z = np.load(npz_path, allow_pickle=False)
    c = Comparison()

    def absd(name, a, b):
        c.abs_diff[name] = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    def reld(name, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        c.rel_checksum_diff[name] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))

    absd("image_embedding_c0_16", ours["image_embedding"][:, :16], z["image_embedding_c0_16"])
    c.f32_arrays_abs_diff["image_embedding_f32"] = float(
        np.max(np.abs(ours["image_embedding"].astype(np.float32) - z["image_embedding_f32"]))
    )
    reld("image_embedding_checksum", ours["image_embedding_checksum"], z["image_embedding_checksum"])
    reld("encoder_block_checksum", ours["encoder_block_checksum"], z["encoder_block_checksum"])
    absd("dense_pe_c0_16", ours["dense_pe"][:, :16], z["dense_pe_c0_16"])
    reld("dense_pe_checksum", ours["dense_pe_checksum"], z["dense_pe_checksum"])
    if "encoder_stage_checksum" in z.files:
        reld("encoder_stage_checksum", ours["encoder_stage_checksum"], z["encoder_stage_checksum"])
        c.f32_arrays_abs_diff["encoder_stages_c0_64_f32"] = float(
            np.max(np.abs(ours["encoder_stages_c0_64"].astype(np.float32) - z["encoder_stages_c0_64_f32"]))
        )
    absd("S1_dense", ours["S1_dense"], z["S1_dense"])
    for sid in ("S1", "S2", "S3", "S4"):
        absd(f"{sid}_sparse", ours[f"{sid}_sparse"], z[f"{sid}_sparse"])
        absd(f"{sid}_lowres", ours[f"{sid}_lowres"], z[f"{sid}_lowres"])
        absd(f"{sid}_iou", ours[f"{sid}_iou"], z[f"{sid}_iou"])
        reld(f"{sid}_dense_checksum", ours[f"{sid}_dense_checksum"], z[f"{sid}_dense_checksum"])
    ref_mask = np.unpackbits(z["S1_mask128_packbits"])[: ours["S1_mask128"].size].astype(bool)
    c.mask_flipped = int(np.count_nonzero(ref_mask != ours["S1_mask128"]))
    return c
