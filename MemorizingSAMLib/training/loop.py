"""The interactive training loop (SAM-Med3D style) with checkpoints, resume, a JSON log and a progress line.

Per sample: encode the crop once; then 1..``max_clicks`` simulated clicks (click 1 at the crop centre, inside the
target, as a session places it; each next one at the interior of the largest error region, include where the
model under-segments), every step fed all clicks so far and the previous low-res logits (detached) as the mask
prompt; the loss (Dice + binary cross-entropy on logits upsampled to the crop, plus optionally ``click_loss`` times
the cross-entropy at the clicked voxels themselves) is averaged over the steps and back-propagated through decoder
and encoder together. AdamW, linear warm-up then cosine decay.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints import load_model, save_checkpoint
from ..distributed import Ranks, barrier
from ..evaluation.clicks import next_click
from ..fileio import atomic_write
from ..modeling.memory_attention import MemoryProvider
from ..modeling.sam3d import Sam3D
from .data import AugmentConfig, Target, TrainingData
from .mixed import MixedTrainingData


@dataclass(frozen=True)
class RunConfig:
    """What every training run has: length, global batch (split over the ranks under torchrun), AdamW, seed,
    and how often it logs and checkpoints."""

    steps: int = 1000
    batch: int = 2
    lr: float = 4e-4
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """The interactive loop's run: warm-up, clicks per sample and what is trained."""

    warmup: int = 50
    max_clicks: int = 5
    # Also keep the weights every this many steps as {tag}_step{N}.pt (for held-out curves; 0: never).
    keep_every: int = 0
    train_encoder: bool = True
    # With a memory (train(..., memory=...)): the share of samples encoded with memory attention active.
    p_memory: float = 0.5
    # Weight of the cross-entropy at the clicked voxels (include: inside, exclude: outside), all clicks so far at
    # every step. The Dice + BCE over the crop hardly sees them (a click is 1 of 64^3 voxels), and a model trained
    # without it learned to leave later clicks outside its mask.
    click_loss: float = 0.0


def segmentation_loss(low: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Dice + BCE of low-res logits (1, 1, L, L, L) upsampled to the target's size (S, S, S); also the hard Dice."""
    up = F.interpolate(low, size=target.shape, mode="trilinear", align_corners=False)[0, 0]
    bce = F.binary_cross_entropy_with_logits(up, target)
    p = torch.sigmoid(up)
    soft_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    with torch.no_grad():
        hard = (up > 0).float()
        dice = float((2 * (hard * target).sum() + 1e-6) / (hard.sum() + target.sum() + 1e-6))
    return bce + soft_dice, dice


def click_consistency_loss(low: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """Binary cross-entropy of the logits at the clicks: ``low`` (1, 1, L, L, L) low-res logits of a crop of
    ``size`` voxels per side, ``points`` (1, N, 3) crop voxels (x, y, z), ``labels`` (1, N) 1 include / 0 exclude.
    The logits are read as ``segmentation_loss`` upsamples them (trilinear, align_corners=False)."""
    # grid_sample's last axis is (W, H, D) = (z, y, x) of low's spatial axes (x, y, z)
    u = (points.to(low.dtype) + 0.5) * (2.0 / size) - 1.0
    grid = u.flip(-1)[:, :, None, None, :]  # (1, N, 1, 1, 3)
    at = F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False).reshape(-1)
    return F.binary_cross_entropy_with_logits(at, labels.reshape(-1).to(low.dtype))


def interactive_sample_loss(
    model: Sam3D,
    x: np.ndarray,
    y: np.ndarray,
    click0: np.ndarray,
    n_clicks: int,
    device,
    dtype,
    memory: MemoryProvider | None = None,
    click_loss: float = 0.0,
) -> tuple[torch.Tensor, list[float]]:
    """Average loss over ``n_clicks`` simulated clicks on one crop (x, y [x, y, z]); Dice after each. ``memory``
    is passed to the encoder; ``click_loss``: see TrainConfig."""
    xt = torch.from_numpy(x).to(device, dtype)[None, None]
    yt = torch.from_numpy(y).to(device, dtype)
    emb = model.encode(xt, memory=memory)
    lr = model.low_res_size
    prev = torch.zeros(1, 1, lr, lr, lr, device=device, dtype=dtype)
    clicks, labels = [click0.astype(np.float32)], [1]
    total, dices = 0.0, []
    gt_kji = y.transpose(2, 1, 0) > 0  # next_click works on [k, j, i] arrays
    for step in range(n_clicks):
        pts = torch.as_tensor(np.stack(clicks), device=device, dtype=dtype)[None]
        lab = torch.as_tensor(labels, device=device)[None]
        low, _ = model.decode(emb, pts, lab, prev)
        loss, d = segmentation_loss(low, yt)
        if click_loss:
            loss = loss + click_loss * click_consistency_loss(low, pts, lab, y.shape[0])
        total = total + loss
        dices.append(d)
        if step + 1 < n_clicks:
            with torch.no_grad():
                up = F.interpolate(low, size=y.shape, mode="trilinear", align_corners=False)[0, 0] > 0
            c = next_click(gt_kji, up.cpu().numpy().transpose(2, 1, 0))
            if c is None:
                break
            clicks.append(np.array(c.ijk, dtype=np.float32))  # (i, j, k) of the [k,j,i] view = (x, y, z)
            labels.append(1 if c.include else 0)
            prev = low.detach()
    return total / len(dices), dices


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class _SampleLoss(torch.nn.Module):
    """One sample's interactive loss as a module's forward, so that DistributedDataParallel sees the call and
    all-reduces the gradients of the backward that follows."""

    def __init__(self, model: Sam3D, click_loss: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.click_loss = click_loss

    def forward(self, x, y, click0, n_clicks: int, device, dtype, memory):
        return interactive_sample_loss(self.model, x, y, click0, n_clicks, device, dtype, memory, self.click_loss)


def prepare_run(cfg: RunConfig, ranks: Ranks, out_dir: str | Path, device) -> tuple[int, Path, torch.device]:
    """This rank's share of the batch, the run folder (made) and the device (CUDA if there is one)."""
    if cfg.batch % ranks.world:
        raise ValueError(f"the batch ({cfg.batch}) must be a multiple of the number of processes ({ranks.world})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return cfg.batch // ranks.world, out, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` (0 .. batch-1) of ``step``: the same whichever rank draws it, so a
    run over N ranks sees the samples one process would, and a resumed run needs no sampler state."""
    return np.random.default_rng([seed, step, index])


def train(
    model: Sam3D,
    data: TrainingData | MixedTrainingData,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    aug: AugmentConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    resume: bool = True,
    params: list[torch.nn.Parameter] | list[dict] | None = None,
    tag: str = "train",
    memory: Callable[[Target], MemoryProvider | None] | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Train ``model`` in place; checkpoints ``out_dir/{tag}_last.pt`` (+ ``.state.pt`` for the optimizer)
    every ``checkpoint_every`` steps and at the end, log lines to ``out_dir/{tag}_log.jsonl``. With ``resume``, a
    previous run's last checkpoint in ``out_dir`` is continued. Returns the final checkpoint path.

    ``memory(target)`` gives the memory provider for a sample of ``target`` (or None); a share ``cfg.p_memory`` of
    the samples is encoded with it, the rest without, so that the model works with and without a bank.

    ``ranks`` (distributed.py, under torchrun): the global batch ``cfg.batch`` is split over the ranks, gradients
    are all-reduced by DistributedDataParallel, and only rank 0 writes checkpoints and logs. Samples are drawn from
    (seed, step, index in the batch), so any number of ranks trains on the same samples, and a run can be resumed
    with another number of ranks."""
    cfg, aug, ranks = cfg or TrainConfig(), aug or AugmentConfig(), ranks or Ranks()
    local, out, device = prepare_run(cfg, ranks, out_dir, device)
    model.to(device=device, dtype=dtype).train()
    if params is None:
        params = [p for n, p in model.named_parameters() if cfg.train_encoder or not n.startswith("image_encoder.")]
    # params: tensors, or optimizer groups {"params": [...], "lr_scale": s} whose learning rate is s times cfg's
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in opt.param_groups for p in g["params"]]
    ck, state_path, log_path = out / f"{tag}_last.pt", out / f"{tag}_last.state.pt", out / f"{tag}_log.jsonl"
    start = 0
    if resume and ck.is_file() and state_path.is_file():
        loaded = load_model(ck, config=model.cfg, device=device, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        st = torch.load(state_path, map_location=device, weights_only=True)
        opt.load_state_dict(st["optimizer"])
        start = int(st["step"])
        if ranks.main:
            print(f"resuming {tag} at step {start}", file=sys.stderr)
    loss_module = _SampleLoss(model, cfg.click_loss)
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters exist by design (the IoU head and the multimask tokens get no loss; frozen parts).
        loss_module = DistributedDataParallel(loss_module, find_unused_parameters=True)
    t0 = time.perf_counter()
    window: list[tuple[float, float]] = []
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg) * g.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        if hasattr(data, "set_step"):
            data.set_step(step)
        for n in range(local):
            rng = sample_rng(cfg.seed, step, ranks.rank * local + n)
            tgt = data.sample_target(rng)
            x, y, c0 = data.crop(tgt, rng, model.cfg, aug)
            n_clicks = int(rng.integers(1, cfg.max_clicks + 1))
            mem = memory(tgt) if memory is not None and rng.random() < cfg.p_memory else None
            # Gradients are all-reduced once per step, in the last sample's backward.
            sync = ranks.active and n < local - 1
            with loss_module.no_sync() if sync else contextlib.nullcontext():
                loss, dices = loss_module(x, y, c0, n_clicks, device, dtype, mem)
                (loss / local).backward()
            window.append((loss.item(), dices[-1]))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        if ranks.main and (done % cfg.log_every == 0 or done == cfg.steps):
            loss_m = float(np.mean([w[0] for w in window]))
            dice_m = float(np.mean([w[1] for w in window]))
            el = time.perf_counter() - t0
            rec = {
                "tag": tag,
                "step": done,
                "loss": round(loss_m, 5),
                "dice": round(dice_m, 4),
                "lr": round(_lr_at(step, cfg), 7),
                "elapsed_s": round(el, 1),
                "processes": ranks.world,
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            rate = (done - start) / el if el > 0 else 0
            eta = (cfg.steps - done) / rate if rate > 0 else 0
            print(
                f"[{tag}] step {done}/{cfg.steps} loss {loss_m:.4f} dice {dice_m:.3f} ({rate:.2f} steps/s, "
                f"eta {eta / 60:.1f} min)",
                file=sys.stderr,
                flush=True,
            )
        if done % cfg.log_every == 0:
            window.clear()
        if not ranks.main:
            continue
        if cfg.keep_every and done % cfg.keep_every == 0:
            kept = out / f"{tag}_step{done}.pt"
            save_checkpoint(model, kept, half=True, metadata={"step": done, "tag": tag, "train_config": asdict(cfg)})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(model, ck, metadata={"step": done, "tag": tag, "train_config": asdict(cfg)})
            state = {"optimizer": opt.state_dict(), "step": done}
            atomic_write(state_path, lambda f: torch.save(state, f))  # noqa: B023 (called at once)
    barrier(ranks)
    model.eval()
    return ck
