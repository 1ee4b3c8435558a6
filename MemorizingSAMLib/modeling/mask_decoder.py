"""Mask decoder: image embedding + prompt tokens -> low-res mask logits (B, M, 4G, 4G, 4G) and IoU predictions.

Token order [iou_token, mask_tokens 0..3, sparse prompt tokens]; ``multimask_output=False`` returns mask 0,
``True`` masks 1..3, with no best-IoU selection (SPEC.md section 7e). Only the hypernetworks of the returned masks
are evaluated, and the upscaling runs channel-last as matrix products.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MaskDecoderConfig
from .ops import MLP, LayerNorm3d, conv_transpose_k2s2
from .transformer import TwoWayTransformer


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

    def upscale(self, image_tokens: torch.Tensor, g: int) -> torch.Tensor:
        """(B, G^3, C) -> channel-last (B, 4G, 4G, 4G, C/8)."""
        up1, ln, act1, up2, act2 = self.output_upscaling
        x = image_tokens.reshape(image_tokens.shape[0], g, g, g, -1)
        x = act1(ln.forward_channels_last(conv_transpose_k2s2(x, up1)))
        return act2(conv_transpose_k2s2(x, up2))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (B or 1, C, G, G, G); returns low-res logits (B, M, 4G, 4G, 4G) and IoU (B, M)."""
        b = sparse_prompt_embeddings.shape[0]
        g = image_embeddings.shape[-1]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        src = src.expand(b, -1, -1, -1, -1).flatten(2).transpose(1, 2)
        pos = image_pe.flatten(2).transpose(1, 2)
        hs, src = self.transformer(src, pos, tokens)
        selected = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in selected], dim=1)
        up = self.upscale(src, g)  # (B, 4G, 4G, 4G, C/8)
        masks = torch.einsum("bdhwc,bmc->bmdhw", up, hyper)
        iou = self.iou_prediction_head(hs[:, 0])
        iou = iou[:, 1:] if multimask_output else iou[:, 0:1]
        return masks, iou
