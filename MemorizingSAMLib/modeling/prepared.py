"""Per-embedding precomputation for repeated decoding (the click path).

Every click decodes the same image embedding E (N = G^3 tokens, C channels) with a new dense prompt D = Z W3^T + b3,
where Z (N, m) are the mask prompt's features before the prompt encoder's last 1x1 convolution (m = 16 channels for
the published models) and W3 (C, m) its weight. The first two-way block projects E + D (+ the positional encoding P)
three times, at C x C_inner each. By linearity

    (E + P + D) W^T + b = [(E + P) W^T + b + b3 W^T] + Z (W W3)^T

so the bracket is computed once per embedding and each click adds a rank-m product: N m C_inner instead of
N C C_inner multiply-adds (16 vs 384 per output for FastSAM3D). Same arithmetic up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hires import split_embedding


@dataclass
class PreparedEmbedding:
    """An image embedding (1, C, G, G, G) with what all its decodings share. Token-major tensors (1, N, .)."""

    embedding: torch.Tensor
    tokens_b3: torch.Tensor  # E + b3: the image tokens entering the decoder, before the rank-m mask part
    pos: torch.Tensor  # P
    w3_t: torch.Tensor  # (m, C)
    k0: torch.Tensor  # token-to-image attention keys of E + P + b3, (1, N, C_inner)
    v0: torch.Tensor  # its values of E + b3
    q0: torch.Tensor  # image-to-token attention queries of E + P + b3
    mk: torch.Tensor  # (m, C_inner): Z -> key update
    mv: torch.Tensor
    mq: torch.Tensor
    hires_rows: torch.Tensor | None = None  # (1, 64 G^3, C/8) high-res features (hires.py), or None
    low_image: torch.Tensor | None = None  # (1, 4G, 4G, 4G) low-res image of hires_image encoders, or None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.__dict__.values() if isinstance(t, torch.Tensor))


@torch.no_grad()
def prepare_embedding(model, embedding: torch.Tensor) -> PreparedEmbedding:
    """Precompute for ``model`` (a Sam3D) and one embedding (1, C [+ high-res], G, G, G) from ``model.encode``."""
    if embedding.shape[0] != 1:
        raise ValueError(f"prepare one embedding at a time, got a batch of {embedding.shape[0]}")
    full = embedding
    embedding, hires_rows, low_image = split_embedding(full, model.cfg.encoder.out_chans)
    conv = model.prompt_encoder.mask_downscaling[-1]
    w3 = conv.weight.flatten(1)  # (C, m)
    b3 = conv.bias if conv.bias is not None else w3.new_zeros(w3.shape[0])
    e = embedding.flatten(2).transpose(1, 2)
    pos = model.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).contiguous()
    block = model.mask_decoder.transformer.layers[0]
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    eb = (e + b3).contiguous()
    ebp = eb + pos
    return PreparedEmbedding(
        embedding=full,
        tokens_b3=eb,
        pos=pos,
        w3_t=w3.t().contiguous(),
        k0=t2i.k_proj(ebp),
        v0=t2i.v_proj(eb),
        q0=i2t.q_proj(ebp),
        mk=(t2i.k_proj.weight @ w3).t().contiguous(),
        mv=(t2i.v_proj.weight @ w3).t().contiguous(),
        mq=(i2t.q_proj.weight @ w3).t().contiguous(),
        hires_rows=None if hires_rows is None else hires_rows.contiguous(),
        low_image=None if low_image is None else low_image.contiguous(),
    )
