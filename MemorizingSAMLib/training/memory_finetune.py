"""Fine-tuning a model with memory attention active, so that it learns to use what a memory bank retrieves.

A model that never saw memory during training gains nothing from a bank (measured: Dice@1 0.445 with and without
on our held-out split). Here the model is converted to a config with learned memory gates and mask-aware memory
values (config.EncoderConfig.memory_mask_values), then trained with the interactive loop while, for a share of the
samples, its memory layer attends over the k nearest *other* training structures (never the sample's own: at use
the bank does not hold the structure being segmented either).

The weights that produce the memory layer's keys and values (patch/position embedding, the blocks before the
memory layer, and its norm1 and qkv) stay frozen, so the in-RAM training memory stays valid while training, and a
bank built from the same structures before or after fine-tuning is the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..distributed import Ranks
from ..memory_bank import structure_entry
from ..modeling.click_maps import widen_state
from ..modeling.config import Sam3DConfig
from ..modeling.memory_attention import RetrievedMemory, inverse_distance_weights, memory_descriptor
from ..modeling.sam3d import Sam3D
from .data import AugmentConfig, Target, TrainingData
from .loop import TrainConfig, train

MEMORY_PARAMETERS = ("memory_gate", "memory_fg", "memory_pos_bias", "memory_prior_vec")
CLICK_MAPS_LR_SCALE = 10.0


def convert_for_memory(
    model: Sam3D, cfg: Sam3DConfig, gate_init: float = 0.0, position_bias_init: float = 6.0
) -> Sam3D:
    """A model of config ``cfg`` (same shapes plus memory gates / mask-aware values) with ``model``'s weights;
    the new gates start at ``gate_init`` (local ratio sigmoid(gate_init): 0.5 for 0), the same-position biases at
    ``position_bias_init`` (6: that key takes about half the attention over 512 keys), the value vectors at 0."""
    out = Sam3D(cfg)
    missing, unexpected = out.load_state_dict(widen_state(model.state_dict(), out.state_dict()), strict=False)
    # Memory parameters and the click-map head (which starts at zero: click_maps.py) may be new.
    new = [k for k in missing if not k.endswith(MEMORY_PARAMETERS) and not k.startswith("mask_decoder.click_maps.")]
    if new or unexpected:
        raise ValueError(f"{model.cfg.name} -> {cfg.name}: not the same architecture (missing {new}, {unexpected})")
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name not in missing:  # parameters the source model had keep their values
                continue
            if name.endswith("memory_gate"):
                p.fill_(gate_init)
            elif name.endswith("memory_pos_bias"):
                p.fill_(position_bias_init)
    return out.to(next(model.parameters()).device)


def frozen_for_memory(name: str, layer: int) -> bool:
    """Whether parameter ``name`` produces the memory layer's keys/values (and so stays frozen)."""
    if name.startswith(("image_encoder.patch_embed.", "image_encoder.pos_embed")):
        return True
    if name.startswith("image_encoder.blocks."):
        i = int(name.split(".")[2])
        rest = ".".join(name.split(".")[3:])
        return i < layer or (i == layer and rest.startswith(("norm1.", "attn.qkv.")))
    return False


class _Retrieving:
    """MemoryProvider that retrieves from a TrainingMemory, skipping some entries."""

    def __init__(self, mem: TrainingMemory, allowed: np.ndarray) -> None:
        self.layer = mem.layer
        self.mem = mem
        self.allowed = allowed

    def retrieve(self, tokens: torch.Tensor) -> RetrievedMemory | None:
        return self.mem.retrieve(memory_descriptor(tokens.detach(), self.mem.kind)[0], self.allowed)


class TrainingMemory:
    """Memory entries (descriptor, keys, values, token foreground) of every target of some training data, in RAM,
    computed with the frozen part of ``model``; retrieval is exact top-k, as MemoryBank does.

    With ``mirrors``, each target also has a left-right mirrored entry. Our training and held-out structures of
    bilateral anatomy are the two sides (AAL: left in training, right held out), so at use the bank's nearest
    entry is often the contralateral twin; a sample's own mirrored entry is what plays that part in training
    (its unmirrored own entry is never retrieved)."""

    def __init__(
        self,
        model: Sam3D,
        data: TrainingData,
        sources: Sequence[str] | None = None,
        k: int = 3,
        progress: Callable[[int, int, str], None] | None = None,
        mirrors: bool = False,
    ) -> None:
        self.layer = model.cfg.memory_layer
        self.k = k
        self.kind = model.cfg.encoder.memory_descriptor
        items = [t for s in sorted(data.targets) if not sources or s in sources for t in data.targets[s]]
        if not items:
            raise ValueError(f"no training targets from sources {list(sources or [])}")
        descs, keys, values, fgs = [], [], [], []
        self.ids, self.sources, self.mirrored = [], [], []
        was_training = model.training
        model.eval()
        for n, t in enumerate(items):
            img, lab = data.images[t.case], data.labels[t.case]
            structure = sitk.Cast(lab == t.value, sitk.sitkFloat32)
            for mirror in (False, True) if mirrors else (False,):
                ijk = np.array(t.interior_kji[::-1], float)
                d, kk, v, fg, _ = structure_entry(model, img, structure, ijk, self.layer, mirror)
                descs.append(d)
                keys.append(kk)
                values.append(v)
                fgs.append(fg)
                self.ids.append((t.case, t.value))
                self.sources.append(t.source)
                self.mirrored.append(mirror)
            if progress:
                progress(n + 1, len(items), f"{t.case}:{t.name}")
        model.train(was_training)
        dev = next(model.parameters()).device
        self.descriptors = torch.from_numpy(np.stack(descs)).to(dev)
        self.keys = torch.from_numpy(np.stack(keys)).to(dev)
        self.values = torch.from_numpy(np.stack(values)).to(dev)
        self.foreground = torch.from_numpy(np.stack(fgs)).to(dev)

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, desc: torch.Tensor, allowed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and distances of the k nearest allowed entries (boolean mask over entries) to ``desc`` (D,)."""
        idx_allowed = torch.from_numpy(np.flatnonzero(allowed)).to(self.descriptors.device)
        d = torch.linalg.vector_norm(self.descriptors[idx_allowed] - desc.to(self.descriptors), dim=1)
        dist, j = torch.topk(d, min(self.k, len(idx_allowed)), largest=False)
        return idx_allowed[j], dist

    def retrieve(self, desc: torch.Tensor, allowed: np.ndarray) -> RetrievedMemory | None:
        if not allowed.any():
            return None
        idx, dist = self.nearest(desc, allowed)
        return RetrievedMemory(
            self.keys[idx], self.values[idx], inverse_distance_weights(dist), 0.3, self.foreground[idx]
        )

    def provider_for(self, target: Target) -> _Retrieving | None:
        """A provider for a sample of ``target`` that never retrieves ``target`` itself; None when the target's
        source has no other entry (phantoms when the memory holds real structures only)."""
        allowed = np.array([i != (target.case, target.value) or m for i, m in zip(self.ids, self.mirrored)])
        same_source = np.array([s == target.source for s in self.sources])
        if not (allowed & same_source).any():
            return None
        return _Retrieving(self, allowed)


def memory_finetune(
    model: Sam3D,
    data: TrainingData,
    out_dir: str | Path,
    cfg: TrainConfig,
    memory_config: Sam3DConfig,
    sources: Sequence[str] | None = None,
    k: int = 3,
    gate_init: float = 0.0,
    memory_lr_scale: float = 10.0,
    mirrors: bool = True,
    aug: AugmentConfig | None = None,
    device=None,
    progress: Callable[[int, int, str], None] | None = None,
    ranks: Ranks | None = None,
    resume: bool = True,
) -> tuple[Sam3D, Path]:
    """Convert ``model`` to ``memory_config`` (unless it already is one), build the training memory from
    ``data``'s targets of ``sources``, and train with memory active for ``cfg.p_memory`` of the samples; the
    frozen part is kept as is; the memory parameters learn ``memory_lr_scale`` times faster. Returns the trained
    model and its checkpoint (``out_dir/memory_last.pt``). ``ranks``: see loop.train (every rank builds the
    same training memory)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=device, dtype=torch.float32)
    if model.cfg != memory_config:
        model = convert_for_memory(model, memory_config, gate_init)
    layer = model.cfg.memory_layer
    if layer < 0:
        raise ValueError(f"{model.cfg.name} has no memory layer")
    print(f"[memory] building the training memory (layer {layer})", file=sys.stderr, flush=True)
    # The memory holds real structures only (a MixedTrainingData's generated cases are not kept).
    mem = TrainingMemory(model, getattr(data, "real", None) or data, sources, k, progress, mirrors=mirrors)
    print(f"[memory] {len(mem)} entries", file=sys.stderr, flush=True)
    for n, p in model.named_parameters():
        p.requires_grad_(not frozen_for_memory(n, layer))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # The few new memory parameters start from "no effect" and must travel further than the pretrained ones.
    # The click-map head (click_maps.py) starts at zero too, and learns CLICK_MAPS_LR_SCALE times faster.
    def is_click_maps(n: str) -> bool:
        return n.startswith("mask_decoder.click_maps.")

    params = [
        {"params": [p for n, p in trainable if not n.endswith(MEMORY_PARAMETERS) and not is_click_maps(n)]},
        {"params": [p for n, p in trainable if n.endswith(MEMORY_PARAMETERS)], "lr_scale": memory_lr_scale},
    ]
    if any(is_click_maps(n) for n, _ in trainable):
        params.append({"params": [p for n, p in trainable if is_click_maps(n)], "lr_scale": CLICK_MAPS_LR_SCALE})
    # No axis flips: the same-position bias relates crop positions, which a flipped sample would scramble.
    aug = aug or AugmentConfig(flip=False)
    ck = train(
        model,
        data,
        out_dir,
        cfg,
        aug,
        device,
        resume=resume,
        params=params,
        tag="memory",
        memory=mem.provider_for,
        ranks=ranks,
    )
    model.requires_grad_(True)
    return model, ck
