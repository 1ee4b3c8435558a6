"""Layer-wise progressive distillation (FastSAM3D), then decoder fine-tuning with the interactive loop.

Student block i (0-based) learns the output of teacher block 2i+1, i.e. student layer i <- teacher layer 2i in
1-based counting (FastSAM3D's 6-from-12 mapping; ours 3-from-6). Layers enter the loss progressively: the
schedule is split into as many stages as the student has blocks, and stage s (1-based) trains blocks 0..s-1
together; the neck output (the image embedding) joins in the last stage. The teacher is frozen. Student and
teacher widths must match (they do for SAM-Med3D -> FastSAM3D and for our configs); the student starts from the
teacher's patch/position embedding, neck, prompt encoder and mask decoder, which have the same shapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import load_model, save_checkpoint
from ..distributed import Ranks, barrier
from ..fileio import atomic_write
from ..modeling.sam3d import Sam3D
from .data import AugmentConfig, TrainingData
from .loop import RunConfig, prepare_run, sample_rng


@dataclass(frozen=True)
class DistillConfig(RunConfig):
    steps: int = 600
    lr: float = 5e-4


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


class _DistillLoss(torch.nn.Module):
    """The distillation loss as a module's forward (for DistributedDataParallel)."""

    def __init__(self, student: Sam3D, teacher: Sam3D) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher]  # a list: not a submodule, so DDP neither syncs nor reduces it

    def forward(self, x: torch.Tensor, n_active: int, with_embedding: bool):
        return distillation_loss(self.student, self.teacher[0], x, n_active, with_embedding)


def distill_encoder(
    student: Sam3D,
    teacher: Sam3D,
    data: TrainingData,
    out_dir: str | Path,
    cfg: DistillConfig | None = None,
    device=None,
    aug: AugmentConfig | None = None,
    resume: bool = True,
    ranks: Ranks | None = None,
) -> Path:
    """Progressive layer-wise distillation of the student encoder; returns the checkpoint path. Checkpoints
    ``out_dir/distill_last.pt`` (+ ``.state.pt``) every ``cfg.checkpoint_every`` steps; with ``resume`` an
    interrupted run continues. Under torchrun (``ranks``) the batch is split over the ranks as in loop.train."""
    cfg, aug, ranks = cfg or DistillConfig(), aug or AugmentConfig(), ranks or Ranks()
    local, out, device = prepare_run(cfg, ranks, out_dir, device)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    params = list(student.image_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ck, state_path = out / "distill_last.pt", out / "distill_last.state.pt"
    start = 0
    if resume and ck.is_file() and state_path.is_file():
        student.load_state_dict(load_model(ck, config=student.cfg, device=device).state_dict())
        st = torch.load(state_path, map_location=device, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        start = int(st["step"])
        if ranks.main:
            print(f"resuming distill at step {start}", file=sys.stderr)
    loss_module = _DistillLoss(student, teacher)
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(loss_module, find_unused_parameters=True)
    n = student.cfg.encoder.depth
    t0, window = time.perf_counter(), []
    for step in range(start, cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        k = active_layers(step, cfg.steps, n)
        opt.zero_grad(set_to_none=True)
        if hasattr(data, "set_step"):
            data.set_step(step)
        for i in range(local):
            rng = sample_rng(cfg.seed, step, ranks.rank * local + i)
            x, _, _ = data.sample(rng, student.cfg, aug)
            xt = torch.from_numpy(x).to(device)[None, None]
            sync = ranks.active and i < local - 1
            with loss_module.no_sync() if sync else contextlib.nullcontext():
                loss, parts = loss_module(xt, k, k == n)
                (loss / local).backward()
            window.append(parts)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        if ranks.main and (done % cfg.log_every == 0 or done == cfg.steps):
            last = window[-1]
            rec = {
                "tag": "distill",
                "step": done,
                "active_layers": k,
                "layer_losses": [round(v, 5) for v in last],
                "elapsed_s": round(time.perf_counter() - t0, 1),
                "processes": ranks.world,
            }
            with open(out / "distill_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(
                f"[distill] step {done}/{cfg.steps} layers {k}/{n} losses {rec['layer_losses']}",
                file=sys.stderr,
                flush=True,
            )
        if done % cfg.log_every == 0:
            window.clear()
        if ranks.main and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(student, ck, metadata={"tag": "distill", "step": done})
            state = {"optimizer": opt.state_dict(), "step": done}
            atomic_write(state_path, lambda f: torch.save(state, f))  # noqa: B023 (called at once)
    barrier(ranks)
    student.eval()
    if not ranks.main:
        return out / "distill_encoder.pt"
    return save_checkpoint(student, out / "distill_encoder.pt", metadata={"tag": "distill", "steps": cfg.steps})
