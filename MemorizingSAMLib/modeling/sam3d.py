"""The composed interactive model: encoder once per crop, prompt encoder + mask decoder per click."""

from __future__ import annotations

import torch
from torch import nn

from .config import Sam3DConfig, get_config
from .hires import split_embedding
from .image_encoder import ImageEncoder3D
from .mask_decoder import MaskDecoder3D
from .prepared import PreparedEmbedding, prepare_embedding
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """SAM-style 3D model. Keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*`` as upstream."""

    def __init__(self, cfg: Sam3DConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.image_encoder = ImageEncoder3D(cfg.encoder)
        self.prompt_encoder = PromptEncoder3D(cfg.prompt_encoder)
        self.mask_decoder = MaskDecoder3D(cfg.mask_decoder)

    @property
    def low_res_size(self) -> int:
        """Side of the low-res logit grid (32 for the published models)."""
        return 4 * self.cfg.encoder.grid

    def encode(self, volume: torch.Tensor, memory=None) -> torch.Tensor:
        """Normalised model-space crop (B, 1, S, S, S) -> image embedding (B, C, G, G, G), or (B, C + 8 C, G, G, G)
        with the high-res features of ``hires_features`` configs (hires.py); ``memory`` (a
        MemoryProvider, e.g. ``MemoryBank.provider()``) adds memory attention at its layer."""
        return self.image_encoder(volume, memory=memory)

    def decode(
        self,
        image_embedding: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask_output: bool = False,
        iou: bool = True,
        product_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt step.

        Args:
            image_embedding: (B, C, G, G, G) from :meth:`encode`, or :meth:`prepare_embedding` of it (faster
                for repeated decoding with a mask prompt).
            points: (B, N, 3) crop voxel coordinates in tensor-dim order (x, y, z); labels (B, N) 1/0/-1.
            mask_input: (B, 1, 4G, 4G, 4G) previous low-res logits (raw), or None.
            boxes: (B, 2, 3) corners, only for models with box embeddings.
            iou: False skips the IoU prediction (returned as None); the logits are the same.
            product_dtype: None (default: exact, in the model's dtype), or a lower precision (torch.bfloat16) for
                the mask decoder's large products with the image tokens: the cross-attentions' products with the 512
                image tokens and both upscaling products, ~85 % of the decoder's multiply-adds (token-side layers,
                softmax, LayerNorm and residuals stay exact). Faster on CPUs with native bf16 dot products
                (AVX512-BF16, AMX) and on GPUs; logits then differ from the exact ones by ~1e-2 (README).
        Returns:
            low-res logits (B, M, 4G, 4G, 4G) and IoU predictions (B, M); M = 1, or 3 with ``multimask_output``.
        """
        pts = None if points is None else (points, labels)
        clicks = self._click_rows(image_embedding, points, labels, mask_input, boxes)
        if isinstance(image_embedding, PreparedEmbedding):
            if mask_input is not None:
                sparse = self.prompt_encoder.sparse(pts, boxes)
                z = self.prompt_encoder.mask_features(mask_input)
                if sparse.shape[0] != z.shape[0]:
                    sparse = sparse.expand(z.shape[0], -1, -1)
                return self.mask_decoder.forward_prepared(
                    image_embedding, sparse, z, multimask_output, iou, product_dtype, clicks
                )
            image_embedding = image_embedding.embedding
        image_embedding, hires_rows, _ = split_embedding(image_embedding, self.cfg.encoder.out_chans)
        sparse, dense = self.prompt_encoder(pts, boxes, mask_input)
        pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder(
            image_embedding, pe, sparse, dense, multimask_output, iou, product_dtype, hires_rows, clicks
        )

    def _click_rows(self, embedding, points, labels, mask_input, boxes) -> torch.Tensor | None:
        """The click-map rows of ``click_maps`` configs (click_maps.py), None for the others."""
        head = self.mask_decoder.click_maps
        if head is None:
            return None
        image = None
        if head.geodesic:
            if isinstance(embedding, PreparedEmbedding):
                image = embedding.low_image
            else:
                image = split_embedding(embedding, self.cfg.encoder.out_chans)[2]
            if image is None:
                raise ValueError("geodesic click maps need the low-res image in the embedding (hires_image)")
        batch = max([1, *(t.shape[0] for t in (points, mask_input, boxes, image) if t is not None)])
        return head(points, labels, mask_input, self.cfg.encoder.grid, self.cfg.encoder.img_size, batch, image)

    def prepare_embedding(self, image_embedding: torch.Tensor) -> PreparedEmbedding:
        """What every :meth:`decode` of this (1, C, G, G, G) embedding shares, computed once (see prepared.py);
        pass the result to :meth:`decode` in place of the embedding. Invalid once the weights change."""
        return prepare_embedding(self, image_embedding)

    def prepare_for_inference(self) -> Sam3D:
        """Eval mode plus prepacked CPU weights for the encoder's large products (a no-op on CUDA / float64).

        The packed copies are an explicit per-module cache, ignored whenever the weights change or autograd is on.
        """
        self.eval()
        self.image_encoder.pack_for_inference()
        self.mask_decoder.pack_for_inference()
        return self

    def count_parameters(self) -> int:
        """Trainable parameters (the Gaussian PE matrix is a buffer and is not counted)."""
        return sum(p.numel() for p in self.parameters())


def build_sam3d(config: str | Sam3DConfig) -> Sam3D:
    """Build an uninitialised model from a config or a config name (see config.CONFIGS)."""
    cfg = get_config(config) if isinstance(config, str) else config
    return Sam3D(cfg)
