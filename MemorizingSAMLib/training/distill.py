"""Layer-wise progressive distillation (FastSAM3D), then decoder fine-tuning with the interactive loop.

Student block i (0-based) learns the output of teacher block 2i+1, i.e. student layer i <- teacher layer 2i in
1-based counting (FastSAM3D's 6-from-12 mapping; ours 3-from-6). Layers enter the loss progressively: the
schedule is split into as many stages as the student has blocks, and stage s (1-based) trains blocks 0..s-1
together; the neck output (the image embedding) joins in the last stage. The teacher is frozen. Student and
teacher widths must match (they do for SAM-Med3D -> FastSAM3D and for our configs); the student starts from the
teacher's patch/position embedding, neck, prompt encoder and mask decoder, which have the same shapes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints import save_checkpoint
from ..modeling.sam3d import Sam3D
from .data import AugmentConfig, TrainingData


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    batch: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 10


def layer_mapping(student: Sam3D, teacher: Sam3D) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs: i <- 2i + 1."""
    ns, nt = student.cfg.encoder.depth, teacher.cfg.encoder.depth
    if nt < 2 * ns:
        raise ValueError(f"teacher has {nt} blocks, the 2i mapping needs at least {2 * ns} for {ns} student blocks")
    if student.cfg.encoder.embed_dim != teacher.cfg.encoder.embed_dim:
        raise ValueError("student and teacher encoders must have the same width for layer-wise distillation")
    return [(i, 2 * i + 1) for i in range(ns)]


def init_student_from_teacher(student: Sam3D, teacher: Sam3D) -> list[str]:
    """Copy every teacher tensor whose key and shape the student shares, except the encoder blocks."""
    ssd, copied = student.state_dict(), []
    with torch.no_grad():
        for k, v in teacher.state_dict().items():
            if k in ssd and ssd[k].shape == v.shape and ".blocks." not in k:
                ssd[k].copy_(v)
                copied.append(k)
    return copied


def active_layers(step: int, total: int, n_layers: int) -> int:
    """How many student blocks are in the loss at ``step`` (1 .. n_layers)."""
    return min(n_layers, 1 + step * n_layers // max(total, 1))


def distillation_loss(
    student: Sam3D, teacher: Sam3D, x: torch.Tensor, n_active: int, with_embedding: bool
) -> tuple[torch.Tensor, list[float]]:
    """Sum of per-layer MSEs (normalised by the teacher output's variance) of the active aligned layers."""
    with torch.no_grad():
        t_emb, t_blocks = teacher.image_encoder(x, return_block_outputs=True)
    s_emb, s_blocks = student.image_encoder(x, return_block_outputs=True)
    losses = []
    for i, j in layer_mapping(student, teacher)[:n_active]:
        losses.append(F.mse_loss(s_blocks[i], t_blocks[j]) / (t_blocks[j].var() + 1e-6))
    if with_embedding:
        losses.append(F.mse_loss(s_emb, t_emb) / (t_emb.var() + 1e-6))
    return sum(losses), [float(v.detach()) for v in losses]


def distill_encoder(
    student: Sam3D,
    teacher: Sam3D,
    data: TrainingData,
    out_dir: str | Path,
    cfg: DistillConfig | None = None,
    device=None,
    aug: AugmentConfig | None = None,
) -> Path:
    """Progressive layer-wise distillation of the student encoder; returns the checkpoint path."""
    cfg, aug = cfg or DistillConfig(), aug or AugmentConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    params = list(student.image_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    n = student.cfg.encoder.depth
    t0, window = time.perf_counter(), []
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        k = active_layers(step, cfg.steps, n)
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.batch):
            x, _, _ = data.sample(rng, student.cfg, aug)
            xt = torch.from_numpy(x).to(device)[None, None]
            loss, parts = distillation_loss(student, teacher, xt, k, with_embedding=k == n)
            (loss / cfg.batch).backward()
            window.append(parts)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            last = window[-1]
            rec = {
                "tag": "distill",
                "step": step + 1,
                "active_layers": k,
                "layer_losses": [round(v, 5) for v in last],
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
            window.clear()
            with open(out / "distill_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(
                f"[distill] step {step + 1}/{cfg.steps} layers {k}/{n} losses {rec['layer_losses']}",
                file=sys.stderr,
                flush=True,
            )
    student.eval()
    return save_checkpoint(student, out / "distill_encoder.pt", metadata={"tag": "distill", "steps": cfg.steps})
