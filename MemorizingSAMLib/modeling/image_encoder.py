"""3D ViT image encoder covering SAM-Med3D (ViT-B), FastSAM3D and our own configs.

Input (B, 1, S, S, S) in model space (tensor axes x=R, y=A, z=S for the published models); tokens are kept
channel-last (B, G, G, G, C) with G = S / patch, token (a, b, c) covering voxels [16a, 16a+16) x ... along
tensor dims 2, 3, 4. Output (B, out_chans, G, G, G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import hires
from .attention import Attention3D
from .config import EncoderConfig
from .hires import HiresStem
from .memory_attention import MemoryProvider, RetrievedMemory, memory_descriptor
from .ops import LayerNorm3d, MLPBlock, conv_stride_eq_kernel, patchify
from .packed_linear import linear, pack_weight


class PatchEmbed3D(nn.Module):
    """Conv3d(in_chans -> embed_dim, kernel = stride = patch), key ``patch_embed.proj``; output channel-last."""

    def __init__(self, patch: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj
        return linear(patchify(x, p.kernel_size[0]), p, lambda: p.weight.reshape(p.out_channels, -1), p.bias)


class Block3D(nn.Module):
    """One transformer block; the variant decides where the norms sit (see config.BLOCK_VARIANTS)."""

    def __init__(self, cfg: EncoderConfig, index: int) -> None:
        super().__init__()
        self.variant = cfg.block_variant
        self.attention_free = index < cfg.attention_free_blocks
        dim = cfg.embed_dim
        if not self.attention_free:
            windowed = cfg.is_windowed(index)
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention3D(
                dim,
                cfg.num_heads,
                qkv_bias=cfg.qkv_bias,
                use_rel_pos=cfg.use_rel_pos,
                rel_pos_size=cfg.window_size if windowed else cfg.grid,
                window_size=cfg.window_size if windowed else 0,
                backend=cfg.attention_backend,
                sparse_group=cfg.sparse_group,
                sparse_dilated=index % 2 == 1,
                memory_gate=cfg.memory_gate,
                memory_mask_values=cfg.memory_mask_values,
                memory_position_bias=cfg.memory_position_bias,
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        lin1, lin2 = self.mlp.lin1, self.mlp.lin2
        return linear(linear(x, lin1, lin1.weight, lin1.bias, gelu=True), lin2, lin2.weight, lin2.bias)

    def forward(self, x: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        if self.attention_free:
            if memory is not None:
                raise ValueError("the memory layer must be a block with attention")
            z = self.norm2(x)
            return z + self.mlp_forward(z)
        if self.variant == "pre_norm":
            y = x + self.attn(self.norm1(x), memory)
            return y + self.mlp_forward(self.norm2(y))
        z = self.norm2(x + self.attn(self.norm1(x), memory))
        return z + self.mlp_forward(z)


class ImageEncoder3D(nn.Module):
    """Patch embedding + position embedding, ``depth`` blocks, and the neck (1x1 conv, LN3d, 3x3 conv, LN3d)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        g = cfg.grid
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block3D(cfg, i) for i in range(cfg.depth))
        if cfg.memory_prior_embedding:
            # u of the memory prior route (see config.EncoderConfig.memory_prior_embedding).
            self.memory_prior_vec = nn.Parameter(torch.zeros(cfg.out_chans))
        if cfg.hires_features:
            self.hires_stem = HiresStem(cfg.patch_size // 4, cfg.hires_channels)
        self.neck = nn.ModuleList(
            [
                nn.Conv3d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
                LayerNorm3d(cfg.out_chans),
                nn.Conv3d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
                LayerNorm3d(cfg.out_chans),
            ]
        )

    def pack_for_inference(self) -> int:
        """Prepack the large matrix products for CPU inference (see packed_linear); returns how many."""
        n = int(pack_weight(self.patch_embed.proj, self.patch_embed.proj.weight.reshape(self.cfg.embed_dim, -1)))
        for blk in self.blocks:
            lins = [blk.mlp.lin1, blk.mlp.lin2] + ([] if blk.attention_free else [blk.attn.qkv, blk.attn.proj])
            n += sum(pack_weight(lin, lin.weight) for lin in lins)
        return n

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> tokens (B, G, G, G, C) after patch and position embedding."""
        return self.patch_embed(x) + self.pos_embed

    def apply_neck(self, tokens: torch.Tensor) -> torch.Tensor:
        """Channel-last tokens (B, G, G, G, C) -> image embedding (B, out_chans, G, G, G)."""
        conv1, ln1, conv3, ln2 = self.neck
        y = ln1.forward_channels_last(conv_stride_eq_kernel(tokens, conv1))
        y = F.conv3d(y.permute(0, 4, 1, 2, 3), conv3.weight, None, padding=1)
        # Contiguous NCDHW once here, so every decoder call adds dense prompts to it at full speed.
        return ln2(y).contiguous()

    def memory_entry(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a memory bank stores for crop ``x`` (B, 1, S, S, S): the keys and values of block ``layer``
        (B, heads, G^3, head_dim each) and the retrieval descriptor of the tokens entering it (B, 2C)."""
        blk = self.blocks[layer]
        if blk.attention_free:
            raise ValueError(f"block {layer} has no attention: it cannot be a memory layer")
        t = self.embed(x)
        for b in self.blocks[:layer]:
            t = b(t)
        _, k, v = blk.attn.qkv_heads(blk.norm1(t))
        return k, v, memory_descriptor(t, self.cfg.memory_descriptor)

    def forward(self, x: torch.Tensor, return_block_outputs: bool = False, memory: MemoryProvider | None = None):
        """Image embedding (B, out_chans, G, G, G), with high-res features (B, out_chans + 64 out_chans/8, G, G, G;
        see hires.py); with ``return_block_outputs`` also the list of every block's
        channel-last output (B, G, G, G, C), which distillation and the compat checks use. With ``memory``, block
        ``memory.layer`` also attends over what the provider retrieves for the tokens entering it."""
        t = self.embed(x)
        outs = []
        retrieved = None
        for i, blk in enumerate(self.blocks):
            mem = memory.retrieve(t) if memory is not None and i == memory.layer else None
            retrieved = mem if mem is not None else retrieved
            t = blk(t, mem)
            if return_block_outputs:
                outs.append(t)
        emb = self.apply_neck(t)
        if hasattr(self, "memory_prior_vec") and retrieved is not None and retrieved.active:
            emb = emb + self.memory_prior(retrieved, emb.shape[-1])
        if self.cfg.hires_features:
            parts = [emb, hires.pack(self.hires_stem(x), self.cfg.grid)]
            if self.cfg.hires_image:
                parts.append(hires.pack(hires.low_res_image(x, self.cfg.patch_size // 4), self.cfg.grid))
            emb = torch.cat(parts, dim=1)
        return (emb, outs) if return_block_outputs else emb

    def memory_prior(self, memory: RetrievedMemory, g: int) -> torch.Tensor:
        """(1, out_chans, G, G, G): the retrieved entries' foreground fractions, weighted like their memory and
        averaged with their left-right mirror (tensor axis x), times the learned vector u."""
        if memory.foreground is None:
            raise ValueError("this model uses the memory prior: the memory must carry foreground fractions")
        f = (memory.weights.to(memory.foreground.dtype)[:, None] * memory.foreground).sum(0).view(g, g, g)
        f = ((f + f.flip(0)) / 2).to(self.memory_prior_vec.dtype)
        return f[None, None] * self.memory_prior_vec.view(1, -1, 1, 1, 1)
