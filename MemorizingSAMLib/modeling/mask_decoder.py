"""Mask decoder: image embedding + prompt tokens -> low-res mask logits (B, M, 4G, 4G, 4G) and IoU predictions.

Token order [iou_token, mask_tokens 0..3, sparse prompt tokens]; ``multimask_output=False`` returns mask 0,
``True`` masks 1..3, with no best-IoU selection (SPEC.md section 7e). Only the hypernetworks of the returned masks
are evaluated; the upscaling runs as matrix products (see upscale_to_masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .click_maps import ClickMaps
from .config import MaskDecoderConfig
from .ops import MLP, LayerNorm3d
from .packed_linear import ensure_packed, linear, pack_linears, pack_weight
from .prepared import PreparedEmbedding
from .transformer import ImageProjections, TwoWayTransformer


def _as_linear_weight(conv: nn.ConvTranspose3d) -> torch.Tensor:
    """(Cin, Cout, 2, 2, 2) transposed-conv kernel -> (8 * Cout, Cin) linear weight, output order (i, j, k, Cout)."""
    return conv.weight.permute(2, 3, 4, 1, 0).reshape(-1, conv.in_channels)


def _add_rows(hires_rows: torch.Tensor | None, click_rows: torch.Tensor | None) -> torch.Tensor | None:
    if click_rows is None:
        return hires_rows
    if hires_rows is None:
        raise ValueError("click maps need the high-resolution rows of a hires_features encoder")
    return hires_rows.to(click_rows.dtype) + click_rows


class MaskDecoder3D(nn.Module):
    def __init__(self, cfg: MaskDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.transformer_dim
        self.transformer = TwoWayTransformer(cfg.depth, c, cfg.num_heads, cfg.mlp_dim, cfg.attention_downsample_rate)
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.output_upscaling = nn.ModuleList(
            [
                nn.ConvTranspose3d(c, c // 4, kernel_size=2, stride=2),
                LayerNorm3d(c // 4),
                nn.GELU(),
                nn.ConvTranspose3d(c // 4, c // 8, kernel_size=2, stride=2),
                nn.GELU(),
            ]
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(c, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth)
        # Our configs only: the clicks drawn on the low-res grid, added to the high-res rows (click_maps.py).
        self.click_maps = ClickMaps(c // 8, cfg.geodesic_click_maps) if cfg.click_maps else None

    def upscale_to_masks(
        self,
        image_tokens: torch.Tensor,
        hyper: torch.Tensor,
        g: int,
        compute_dtype: torch.dtype | None = None,
        hires_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upscale (B, G^3, C) image tokens twice (ConvTranspose k2 s2, LN3d, GELU, ConvTranspose k2 s2, GELU) and
        contract with the hypernetwork outputs (B, M, C/8) -> low-res logits (B, M, 4G, 4G, 4G).

        Both transposed convolutions act voxel by voxel, so the sub-voxel order does not matter until the end:
        rows stay ordered (voxel, sub-voxel 1, sub-voxel 2) and only the final (B, M, 64 G^3) logits are permuted
        into place, instead of the 48-channel feature map.

        ``compute_dtype`` (e.g. torch.bfloat16): the two transposed-convolution products in that dtype (fp32
        accumulation in oneDNN; LayerNorm, GELU and the hypernetwork product stay in the tokens' dtype); None:
        everything in the tokens' dtype. See ``Sam3D.decode(product_dtype=...)``.

        ``hires_rows`` (B or 1, 64 G^3, C/8): high-resolution image features in the same row order (hires.py),
        added to the second transposed convolution's output before its GELU.
        """
        up1, ln, act1, up2, _ = self.output_upscaling
        b, c = image_tokens.shape[0], image_tokens.shape[-1]
        c4, c8 = up1.out_channels, up2.out_channels
        dtype = image_tokens.dtype
        cd = compute_dtype or dtype
        w1, w2 = (lambda: _as_linear_weight(up1)), (lambda: _as_linear_weight(up2))
        if cd != dtype and not torch.is_grad_enabled():
            # The reduced-precision packs are made on first use (a few hundred kB).
            ensure_packed(up1, w1, 512, cd)
            ensure_packed(up2, w2, self.UPSCALE_CHUNK_ROWS, cd)
        x = linear(image_tokens.reshape(-1, c).to(cd), up1, w1, up1.bias.repeat(8)).view(-1, c4)
        x = act1(ln.forward_channels_last(x.to(dtype))).to(cd)
        bias2 = up2.bias.repeat(8)
        m = hyper.shape[1]
        if torch.is_grad_enabled() or x.device.type != "cpu":
            # The GELU after the second transposed convolution is fused into the product on the packed path.
            if hires_rows is None:
                y = linear(x, up2, w2, bias2, gelu=True).view(b, -1, c8).to(dtype)
            else:
                y = F.gelu(linear(x, up2, w2, bias2).view(b, -1, c8).to(dtype) + hires_rows.to(dtype))
            masks = torch.bmm(hyper, y.transpose(1, 2))  # (B, M, G^3 * 64), rows (d, h, w, i1, j1, k1, i2, j2, k2)
        else:
            masks = self._second_upscaling_chunked(x.view(b, -1, c4), hyper, bias2, hires_rows).transpose(1, 2)
        return torch.take(masks, self._scatter_index(b, m, g, masks.device)).view(b, m, 4 * g, 4 * g, 4 * g)

    # Rows of the second product per chunk: its (rows * 8, C/8) output (1.5 MB at 1024 rows) is contracted with the
    # hypernetwork outputs while still in cache, instead of writing and re-reading the whole 6 MB feature map and
    # allocating it every click (A/B in the click loop: -1.0 and -0.9 ms per decode in two runs, +0.2 in a third).
    UPSCALE_CHUNK_ROWS = 1024

    def _second_upscaling_chunked(
        self, x: torch.Tensor, hyper: torch.Tensor, bias2: torch.Tensor, hires_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Second transposed convolution + GELU + hypernetwork product, chunk by chunk (inference on CPU only:
        it writes into a preallocated output). x (B, 8 G^3, C/4) in the compute dtype, hyper (B, M, C/8) ->
        (B, 64 G^3, M) in hyper's dtype."""
        up2 = self.output_upscaling[3]
        b, n, _ = x.shape
        c8 = up2.out_channels
        out = hyper.new_empty(b, n * 8, hyper.shape[1])
        step = self.UPSCALE_CHUNK_ROWS
        for i in range(b):
            h_t = hyper[i].t()
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                y = linear(x[i, r0:r1], up2, lambda: _as_linear_weight(up2), bias2, gelu=hires_rows is None)
                y = y.view(-1, c8).to(h_t.dtype)
                if hires_rows is not None:
                    y = F.gelu(y + hires_rows[i if hires_rows.shape[0] > 1 else 0, r0 * 8 : r1 * 8].to(y.dtype))
                torch.mm(y, h_t, out=out[i, r0 * 8 : r1 * 8])
        return out

    def _scatter_index(self, b: int, m: int, g: int, device: torch.device) -> torch.Tensor:
        """Flat gather index putting (d, h, w, i1, j1, k1, i2, j2, k2) rows at (4d + 2 i1 + i2, ...): one gather
        instead of a 10-D permute (measured 39 vs 409 us). Cached on the module per (b, m, g, device)."""
        key = (b, m, g, str(device))
        cache = self.__dict__.setdefault("_index_cache", {})
        if key not in cache:
            n = b * m * 64 * g**3
            # A normal tensor even when first made under inference_mode: training later saves it for backward.
            with torch.inference_mode(False):
                src = torch.arange(n, device=device).view(b, m, g, g, g, 2, 2, 2, 2, 2, 2)
                cache[key] = src.permute(0, 1, 2, 5, 8, 3, 6, 9, 4, 7, 10).reshape(-1).contiguous()
        return cache[key]

    def pack_for_inference(self) -> int:
        """Prepack the upscaling products and every token-side linear layer (see packed_linear)."""
        up1, _, _, up2, _ = self.output_upscaling
        n = int(pack_weight(up1, _as_linear_weight(up1), 512)) + int(pack_weight(up2, _as_linear_weight(up2), 4096))
        return n + pack_linears(self, batch_hint=8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        with_iou: bool = True,
        product_dtype: torch.dtype | None = None,
        hires_rows: torch.Tensor | None = None,
        click_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image_embeddings (B or 1, C, G, G, G), ``hires_rows`` see upscale_to_masks, ``click_rows`` (B, 64 G^3,
        C/8) from ``self.click_maps``, added to them; returns low-res logits
        (B, M, 4G, 4G, 4G) and IoU (B, M), or None with ``with_iou=False`` (the IoU token then skips the final
        attention and the IoU head).
        ``product_dtype``: the products with the image tokens (two-way transformer, upscaling) in that dtype,
        see ``Sam3D.decode``."""
        b = sparse_prompt_embeddings.shape[0]
        g = image_embeddings.shape[-1]
        tokens = self._tokens(sparse_prompt_embeddings)
        src = image_embeddings + dense_prompt_embeddings
        # Token-major (B, N, C) once here, instead of a copy inside each of the transformer's products.
        src = src.expand(b, -1, -1, -1, -1).flatten(2).transpose(1, 2).contiguous()
        pos = image_pe.flatten(2).transpose(1, 2).contiguous()
        rows = _add_rows(hires_rows, click_rows)
        return self._run(src, pos, tokens, None, multimask_output, g, with_iou, product_dtype, rows)

    def forward_prepared(
        self,
        prep: PreparedEmbedding,
        sparse_prompt_embeddings: torch.Tensor,
        mask_features: torch.Tensor,
        multimask_output: bool,
        with_iou: bool = True,
        product_dtype: torch.dtype | None = None,
        click_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` for a prepared embedding and the mask prompt's features (B, m, G, G, G) before the prompt
        encoder's last 1x1 convolution (see prepared.py); the same outputs up to rounding."""
        b = sparse_prompt_embeddings.shape[0]
        g = prep.embedding.shape[-1]
        tokens = self._tokens(sparse_prompt_embeddings)
        z = mask_features.flatten(2).transpose(1, 2)  # (B, N, m)
        src = torch.baddbmm(prep.tokens_b3, z, prep.w3_t.expand(b, -1, -1))
        attn = self.transformer.layers[0].cross_attn_token_to_image
        h = attn.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, C_inner) -> (B, h, N, d)
            return x.view(b, x.shape[1], h, -1).transpose(1, 2)

        proj = ImageProjections(
            heads(torch.baddbmm(prep.k0, z, prep.mk.expand(b, -1, -1))),
            heads(torch.baddbmm(prep.v0, z, prep.mv.expand(b, -1, -1))),
            heads(torch.baddbmm(prep.q0, z, prep.mq.expand(b, -1, -1))).transpose(2, 3),
        )
        rows = _add_rows(prep.hires_rows, click_rows)
        return self._run(src, prep.pos, tokens, proj, multimask_output, g, with_iou, product_dtype, rows)

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """Decoder tokens (B, 1 + M + N, C): IoU token, mask tokens, then the sparse prompt embeddings."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        return torch.cat([out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)

    def _run(
        self,
        src,
        pos,
        tokens,
        proj,
        multimask_output: bool,
        g: int,
        with_iou: bool = True,
        product_dtype=None,
        hires_rows=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        selected = list(range(1, self.num_mask_tokens)) if multimask_output else [0]
        # Only the IoU token (if wanted) and the selected mask tokens are read after the transformer.
        rows = ([0] if with_iou else []) + [1 + i for i in selected]
        hs, src = self.transformer(src, pos, tokens, proj, rows=rows, product_dtype=product_dtype)
        first = 1 if with_iou else 0
        hyper = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, first + j]) for j, i in enumerate(selected)], dim=1
        )
        masks = self.upscale_to_masks(src, hyper, g, product_dtype, hires_rows)
        if not with_iou:
            return masks, None
        iou = self.iou_prediction_head(hs[:, 0])
        iou = iou[:, 1:] if multimask_output else iou[:, 0:1]
        return masks, iou
