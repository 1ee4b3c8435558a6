"""Prompt encoder: clicks (and, for models that have them, box corners) -> sparse tokens; a low-res mask -> dense
embedding. Reproduces the published behaviour exactly (SPEC.md section 7d), including its axis swap in the dense
positional encoding.

Point coordinates are voxel indices of the model-space crop in tensor-dim order (dim2, dim3, dim4) = (x, y, z)
for the published models, as float or int tensors of shape (B, N, 3). Labels (B, N): 1 include, 0 exclude,
-1 padding (ignored point).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PromptEncoderConfig
from .ops import LayerNorm3d

# Point-embedding slots: 0 exclude click, 1 include click, 2/3 box min/max corner (only in models with 4 slots).
BOX_CORNER_SLOTS = (2, 3)


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features: PE(c) = [sin t, cos t, sin t], t = 2*pi*((2c - 1) @ G), c in [0, 1]^3."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 3) normalised to [0, 1] -> (..., 3 * num_pos_feats) in the Gaussian matrix' dtype."""
        g = self.positional_encoding_gaussian_matrix
        # Upstream runs this in float32 for a float32 model; following the matrix' dtype keeps that, and lets a
        # float64 model be exact (the coordinates are exact in either).
        c = 2 * coords.to(g.dtype) - 1
        theta = (c @ g) * (2 * math.pi)
        s = torch.sin(theta)
        return torch.cat([s, torch.cos(theta), s], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """Dense PE (1, C, size, size, size). The vector at (a, b, c) is PE(((b+.5)/s, (a+.5)/s, (c+.5)/s)):
        the first two axes are swapped relative to points, exactly as upstream."""
        g = self.positional_encoding_gaussian_matrix
        r = (torch.arange(size, device=g.device, dtype=g.dtype) + 0.5) / size
        a, b, c = torch.meshgrid(r, r, r, indexing="ij")
        pe = self.encode(torch.stack([b, a, c], dim=-1))
        return pe.permute(3, 0, 1, 2).unsqueeze(0)


class PromptEncoder3D(nn.Module):
    def __init__(self, cfg: PromptEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        if c % 3:
            raise ValueError(f"prompt embed_dim {c} must be divisible by 3 (PE is [sin, cos, sin])")
        self.pe_layer = PositionEmbeddingRandom3D(c // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, c) for _ in range(cfg.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, c)
        m = cfg.mask_in_chans
        self.mask_downscaling = nn.ModuleList(
            [
                nn.Conv3d(1, m // 4, kernel_size=2, stride=2),
                LayerNorm3d(m // 4),
                nn.GELU(),
                nn.Conv3d(m // 4, m, kernel_size=2, stride=2),
                LayerNorm3d(m),
                nn.GELU(),
                nn.Conv3d(m, c, kernel_size=1),
            ]
        )
        self.no_mask_embed = nn.Embedding(1, c)

    @property
    def supports_boxes(self) -> bool:
        return self.cfg.num_point_embeddings >= 4

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, G, G, G) positional encoding of the image-embedding grid.

        It depends only on the Gaussian matrix, so inference reuses it: an explicit one-entry cache keyed by the
        matrix' identity, version, dtype and device (recomputed under autograd, so training sees the graph)."""
        g = self.pe_layer.positional_encoding_gaussian_matrix
        if torch.is_grad_enabled() and g.requires_grad:
            return self.pe_layer.dense(self.cfg.image_embedding_size)
        key = (g.data_ptr(), g._version, g.dtype, g.device)
        cached = self.__dict__.get("_dense_pe_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.pe_layer.dense(self.cfg.image_embedding_size).contiguous())
            self.__dict__["_dense_pe_cache"] = cached
        return cached[1]

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 3) voxel coords + (B, N) labels -> (B, N [+1], C); ``pad`` appends one ignored point."""
        g = self.pe_layer.positional_encoding_gaussian_matrix
        points = points.to(g.dtype) + 0.5
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.encode(points / self.cfg.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.to(pe.dtype), pe)
        for slot in (0, 1):
            emb = emb + (lab == slot).to(pe.dtype) * self.point_embeddings[slot].weight
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3) min/max corners in voxel coords -> (B, 2, C). Only for models trained with box slots."""
        if not self.supports_boxes:
            raise ValueError(
                "this model has no box embeddings (the published SAM-Med3D/FastSAM3D checkpoints have none); "
                "use InteractiveSession.add_box, which turns a box into prompts such a model understands"
            )
        g = self.pe_layer.positional_encoding_gaussian_matrix
        pe = self.pe_layer.encode((boxes.to(g.dtype) + 0.5) / self.cfg.input_image_size)
        lo, hi = BOX_CORNER_SLOTS
        return torch.stack(
            [pe[:, 0] + self.point_embeddings[lo].weight[0], pe[:, 1] + self.point_embeddings[hi].weight[0]],
            1,
        )

    def embed_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4G, 4G, 4G) mask logits -> (B, C, G, G, G)."""
        return self.mask_downscaling[-1](self.mask_features(masks))

    def mask_features(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4G, 4G, 4G) mask logits -> (B, m, G, G, G): the dense path before its last 1x1 convolution."""
        # Few channels: the convolution kernels beat patch-gathering here (measured 59 vs 476 us for the first).
        x = masks
        for layer in self.mask_downscaling[:-1]:
            x = layer(x)
        return x

    def sparse(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None) -> torch.Tensor:
        """The sparse embeddings of :meth:`forward` alone (B, N_tokens, C)."""
        bs = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else 1
        sparse = self.not_a_point_embed.weight.new_empty(bs, 0, self.cfg.embed_dim)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes).to(sparse.dtype)], dim=1)
        return sparse

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (B, N_tokens, C) and dense (B, C, G, G, G) embeddings.

        With ``boxes=None`` one padding point is appended after the clicks, as upstream does.
        """
        bs = 1
        for t in (points[0] if points is not None else None, boxes, masks):
            if t is not None:
                bs = t.shape[0]
                break
        sparse = self.sparse(points, boxes)
        if sparse.shape[0] != bs:
            sparse = sparse.expand(bs, -1, -1)
        if masks is not None:
            dense = self.embed_mask(masks)
        else:
            s = self.cfg.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, s, s, s)
        return sparse, dense
