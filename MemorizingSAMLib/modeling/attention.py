"""Multi-head self-attention of the 3D ViT encoder.

Backends:
- dense, global (FastSAM3D, SAM-Med3D global blocks): all G^3 tokens attend to each other, with the upstream
  relative-position bias passed to ``scaled_dot_product_attention`` as an additive mask.
- dense, padded window (SAM-Med3D window blocks): upstream zero-pads the G^3 grid to one L^3 window (8^3 -> 14^3,
  2744 positions) and attends over all of it. We attend over the G^3 real keys plus ONE virtual key that stands
  for all L^3 - G^3 padding keys at once: its content logit is 0, its bias is log(sum over padding keys of
  e^logit) in closed form (relpos.padded_key_logmass), and its value is the padding value b_v. The softmax over
  G^3 + 1 keys is then identical to upstream's over L^3 keys, at 513 instead of 2744 keys.
- grouped (sparse, our own models only): see sparse_attention.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .memory_attention import RetrievedMemory, attend_memory
from .packed_linear import linear
from .relpos import padded_key_logmass, real_key_bias, rel_pos_factors
from .sparse_attention import grouped_attention


class Attention3D(nn.Module):
    """Self-attention on channel-last tokens (B, G, G, G, C) with upstream key names (qkv, proj, rel_pos_*)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_size: int = 8,
        window_size: int = 0,
        backend: str = "dense",
        sparse_group: int = 2,
        sparse_dilated: bool = False,
        memory_gate: bool = False,
        memory_mask_values: bool = False,
        memory_position_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.window_size = window_size
        self.backend = backend
        self.sparse_group = sparse_group
        self.sparse_dilated = sparse_dilated
        if memory_gate:
            # Learned per-head local ratio r = sigmoid(gate) for models we train (0 -> r = 0.5).
            self.memory_gate = nn.Parameter(torch.zeros(num_heads))
        if memory_mask_values:
            # e_h of the mask-aware memory values (see config.EncoderConfig.memory_mask_values).
            self.memory_fg = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        if memory_position_bias:
            # beta_h of the same-position memory bias (see config.EncoderConfig.memory_position_bias).
            self.memory_pos_bias = nn.Parameter(torch.zeros(num_heads))
        if use_rel_pos:
            n = 2 * rel_pos_size - 1
            self.rel_pos_d = nn.Parameter(torch.zeros(n, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(n, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(n, self.head_dim))

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, G, G, G, C) -> q, k, v each (B, heads, G^3, head_dim)."""
        b, n = x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]
        qkv = linear(x.reshape(b, n, -1), self.qkv, self.qkv.weight, self.qkv.bias).view(
            b, n, 3, self.num_heads, self.head_dim
        )
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def attention_logits_extra(
        self, q: torch.Tensor, g: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Additive bias over real keys (B, h, N, N) and, for a padded window, the virtual key's (bias, value)."""
        b, h, n, hd = q.shape
        window = self.window_size if self.window_size > g else 0
        size = window or g
        pad_q = pad_k = pad_v = None
        if window:
            if self.qkv.bias is not None:
                pad_q, pad_k, pad_v = self.qkv.bias.view(3, h, hd).unbind(0)
            else:
                pad_q = pad_k = pad_v = q.new_zeros(h, hd)
        bias = virtual_bias = virtual_value = None
        if self.use_rel_pos:
            qg = q.reshape(b * h, g, g, g, hd)
            pq = None if pad_q is None else pad_q.repeat(b, 1)
            t1, t2, t3 = rel_pos_factors(qg, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, size, pq)
            bias = real_key_bias(t1, t2, t3, g).view(b, h, n, n)
            if window:
                virtual_bias = padded_key_logmass(t1, t2, t3, g).view(b, h, n)
        elif window:
            virtual_bias = q.new_full((b, h, n), math.log(size**3 - g**3))
        if window:
            # The content logit of every padding key is s * q . b_k.
            virtual_bias = virtual_bias + self.scale * torch.einsum("bhnd,hd->bhn", q, pad_k)
            virtual_value = pad_v
        return bias, virtual_bias, virtual_value

    def forward(self, x: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        b, g = x.shape[0], x.shape[1]
        q, k, v = self.qkv_heads(x)
        out = self.attend(q, k, v, g)
        if memory is not None and memory.active:
            mem = attend_memory(
                q, memory, self.scale, getattr(self, "memory_fg", None), getattr(self, "memory_pos_bias", None)
            )
            if hasattr(self, "memory_gate"):
                r = torch.sigmoid(self.memory_gate).view(1, -1, 1, 1).to(out.dtype)
            else:
                r = memory.local_ratio
            out = r * out + (1 - r) * mem
        out = out.transpose(1, 2).reshape(b, g, g, g, -1)
        return linear(out, self.proj, self.proj.weight, self.proj.bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int) -> torch.Tensor:
        """Attention core: q, k, v (B, h, N, hd) -> (B, h, N, hd)."""
        if self.backend == "grouped":
            return grouped_attention(q, k, v, g, self.sparse_group, self.sparse_dilated, self.scale)
        bias, virtual_bias, virtual_value = self.attention_logits_extra(q, g)
        if virtual_bias is not None:
            b, h, n, hd = q.shape
            k = torch.cat([k, k.new_zeros(b, h, 1, hd)], dim=2)
            v = torch.cat([v, virtual_value[None, :, None, :].expand(b, h, 1, hd).to(v.dtype)], dim=2)
            if bias is None:
                bias = q.new_zeros(b, h, n, n)
            bias = torch.cat([bias, virtual_bias[..., None]], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
