"""Two-way transformer of the mask decoder (tokens <-> image embedding), upstream key names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import MLPBlock
from .packed_linear import Linear


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None, bias: torch.Tensor | None = None):
    """Batched ``a @ b`` (+ ``bias``) in ``dtype`` when given (bfloat16: fp32 accumulation inside oneDNN, result
    rounded to bf16), returned in a's dtype; None: exactly ``torch.matmul`` / ``torch.baddbmm``."""
    if dtype is None or dtype == a.dtype:
        return torch.matmul(a, b) if bias is None else torch.baddbmm(bias, a, b)
    out = torch.matmul(a.to(dtype), b.to(dtype)).to(a.dtype)
    return out if bias is None else out.add_(bias)


class DecoderAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections and an optional internal downsampling of the width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the attention width {inner}")
        self.num_heads = num_heads
        self.q_proj = Linear(dim, inner)
        self.k_proj = Linear(dim, inner)
        self.v_proj = Linear(dim, inner)
        self.out_proj = Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Literal form: project q, k, v, attend per head, concatenate, project out."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    # The two cross-attentions between a few prompt tokens (T ~ 5 + clicks) and many image tokens (N = 512) are
    # evaluated with the image-side projections absorbed into the token side: per head,
    #   q_h . (W_k,h k_j + b_k,h) = (q_h W_k,h) . k_j + q_h . b_k,h
    # so no (N x C) @ (C x C/2) projection of the image tokens is needed; the cost drops from ~4 N C^2/2 to
    # ~4 h T N C multiply-adds per attention. Same arithmetic, different association (rounding-level changes only).

    def _absorb(self, num_tokens: int) -> bool:
        """The absorbed form costs ~2 h T N C multiply-adds, the literal one ~2 N C C_inner: absorb while
        h T < C_inner (T < 24 prompt tokens for the published decoder)."""
        return self.num_heads * num_tokens < self.q_proj.out_features

    def _head_weight(self, lin: nn.Linear) -> torch.Tensor:
        """(inner, C) weight -> (h, d, C)."""
        return lin.weight.view(self.num_heads, -1, lin.weight.shape[1])

    def tokens_to_image(
        self, q_tok: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Same as ``forward(q_tok, k_img, v_img)`` for few queries (B, T, C) and many keys (B, N, C); ``dtype``:
        the two products with the image tokens in that dtype (see _product)."""
        b, t, _ = q_tok.shape
        h = self.num_heads
        if not self._absorb(t):
            return self.forward(q_tok, k_img, v_img)
        q = self._heads(self.q_proj(q_tok))  # (B, h, T, d)
        d = q.shape[-1]
        a = torch.matmul(q, self._head_weight(self.k_proj))  # (B, h, T, C)
        logits = _product(a.reshape(b, h * t, -1), k_img.transpose(1, 2), dtype).view(b, h, t, -1)
        logits = logits + (q * self.k_proj.bias.view(h, 1, d)).sum(-1, keepdim=True)
        p = torch.softmax(logits * d**-0.5, dim=-1)
        pv = _product(p.view(b, h * t, -1), v_img, dtype).view(b, h, t, -1)  # (B, h, T, C)
        # Softmax rows sum to one, so the value bias passes through unchanged.
        out = torch.matmul(pv, self._head_weight(self.v_proj).transpose(1, 2)) + self.v_proj.bias.view(h, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def image_to_tokens(
        self, q_img: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Same as ``forward(q_img, k_tok, v_tok)`` for many queries (B, N, C) and few keys (B, T, C); ``dtype``
        as in tokens_to_image."""
        b, n, c = q_img.shape
        t = k_tok.shape[1]
        h = self.num_heads
        if not self._absorb(t):
            return self.forward(q_img, k_tok, v_tok)
        k = self._heads(self.k_proj(k_tok))  # (B, h, T, d)
        v = self._heads(self.v_proj(v_tok))
        d = k.shape[-1]
        kq = torch.matmul(k, self._head_weight(self.q_proj))  # (B, h, T, C)
        kb = (k * self.q_proj.bias.view(h, 1, d)).sum(-1)  # (B, h, T)
        # Logits laid out (B, h*T, N): the softmax over the few keys then runs along a strided axis of length T,
        # which vectorises over N (20 us) where a softmax over a last axis of length 7 does not (300 us).
        logits = _product(kq.reshape(b, h * t, c), q_img.transpose(1, 2), dtype, kb.reshape(b, h * t, 1))
        return self._few_keys_output(logits, v, dtype)

    def _few_keys_output(self, logits: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Softmax over the T keys of logits (B, h*T, N) and the output projection absorbed into the values
        v (B, h, T, d): (B, N, C_out). Costs ~N h T C_out instead of N C_inner C_out while h T < C_inner."""
        b, h, t, d = v.shape
        n = logits.shape[-1]
        p = torch.softmax((logits * d**-0.5).view(b, h, t, n), dim=2)
        w_out = self.out_proj.weight.view(-1, h, d).permute(1, 2, 0)  # (h, d, C_out)
        vo = torch.matmul(v, w_out)  # (B, h, T, C_out)
        return _product(
            p.view(b, h * t, n).transpose(1, 2), vo.reshape(b, h * t, -1), dtype, self.out_proj.bias.view(1, 1, -1)
        )

    def tokens_to_projected_image(self, q_tok: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor):
        """``forward`` for few queries (B, T, C) against image keys/values already projected and split into heads,
        (B, h, N, d) each (see PreparedEmbedding)."""
        b, t, _ = q_tok.shape
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q_tok)), k_heads, v_heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def projected_image_to_tokens(
        self, q_heads_t: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, dtype: torch.dtype | None = None
    ):
        """``forward`` for image queries already projected, as (B, h, d, N), against few tokens (B, T, C)."""
        b, t, _ = k_tok.shape
        k = self._heads(self.k_proj(k_tok))  # (B, h, T, d)
        v = self._heads(self.v_proj(v_tok))
        h, d, n = self.num_heads, k.shape[-1], q_heads_t.shape[-1]
        logits = torch.matmul(k, q_heads_t).view(b, h * t, n)
        if not self._absorb(t):
            p = torch.softmax((logits * d**-0.5).view(b, h, t, n), dim=2)
            out = torch.matmul(p.transpose(2, 3), v)  # (B, h, N, d)
            return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
        return self._few_keys_output(logits, v, dtype)


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = DecoderAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DecoderAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, num_heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward_prepared(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        proj: ImageProjections,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with the image-side projections of both cross-attentions given (first block only: they
        are projections of keys + key_pe and keys as they enter the decoder)."""
        queries = self._self_attention(queries, query_pe)
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image.tokens_to_projected_image(q, proj.k, proj.v))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token.projected_image_to_tokens(proj.q_t, q, queries, dtype))
        return queries, keys

    def _self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``dtype``: the products with the image tokens in that dtype (None: exact; see _product)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image.tokens_to_image(q, k, keys, dtype))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token.image_to_tokens(k, q, queries, dtype))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        tokens: torch.Tensor,
        first_projections: ImageProjections | None = None,
        rows: list[int] | None = None,
        product_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, N_img, C), image_pe (1 or B, N_img, C), tokens (B, T, C) -> (tokens, image) updated.

        ``first_projections``: the first block's image-side projections, precomputed (same result). ``rows``:
        only these output tokens are needed; the final attention (which updates tokens only) runs for them alone
        and the returned tokens are those rows, in that order. ``product_dtype``: the products with the 512 image
        tokens in that dtype (e.g. torch.bfloat16; None: exact).
        """
        queries, keys = tokens, image
        for i, layer in enumerate(self.layers):
            if i == 0 and first_projections is not None:
                queries, keys = layer.forward_prepared(queries, keys, tokens, first_projections, product_dtype)
            else:
                queries, keys = layer(queries, keys, tokens, image_pe, product_dtype)
        if rows is not None:
            queries, tokens = queries[:, rows], tokens[:, rows]
        q = queries + tokens
        k = keys + image_pe
        queries = self.norm_final_attn(
            queries + self.final_attn_token_to_image.tokens_to_image(q, k, keys, product_dtype)
        )
        return queries, keys


@dataclass
class ImageProjections:
    """Image-side projections of the first two-way block, split into heads: k and v of its token-to-image
    attention (B, h, N, d) and q of its image-to-token attention, transposed (B, h, d, N)."""

    k: torch.Tensor
    v: torch.Tensor
    q_t: torch.Tensor
