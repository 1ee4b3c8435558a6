"""High-resolution image features for the mask head (our configs with ``EncoderConfig.hires_features``).

The published decoders build a mask from the 8^3 image tokens alone: each token's two transposed convolutions
(kernel 2, stride 2) fill its 4 x 4 x 4 block of the low-res logit grid, so inside a token the mask can only take
one of the shapes its channels encode, and masks come out as round blobs. Here a light stem reads the crop itself
at the low-res grid's resolution, and its features join the decoder's upscaled features before the last GELU,
voxel by voxel, so the prompt-dependent hypernetwork can pick the voxels that look like the clicked structure.

Packing: the features (B, c, 4G, 4G, 4G) travel as 64 c extra channels of the image embedding (B, C + 64 c, G,
G, G), so that everything that caches or moves an embedding (session, embedding cache, server) keeps one tensor.
Channel order per token is (i1, j1, k1, i2, j2, k2, c) for the low-res voxel (4d + 2 i1 + i2, 4h + 2 j1 + j2,
4w + 2 k1 + k2): the row order of the decoder's upscaled features (mask_decoder.upscale_to_masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HiresStem(nn.Module):
    """Crop (B, 1, S, S, S) -> features (B, c, S/s, S/s, S/s), s = patch/4: a strided 3D convolution whose kernel
    (2s) is centred on each output voxel's s^3 block, GELU, a pointwise convolution. (A 3x3x3 second convolution
    cost 42 ms on CPU against 1 ms for this one, measured at 64^3 with 16 hidden channels.)"""

    def __init__(self, stride: int, channels: int, hidden: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, hidden, kernel_size=2 * stride, stride=stride, padding=stride // 2)
        self.conv2 = nn.Conv3d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


def pack(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, c, 4G, 4G, 4G) -> (B, 64 c, G, G, G) in the channel order of the module docstring."""
    b, c = features.shape[:2]
    g = grid
    f = features.view(b, c, g, 2, 2, g, 2, 2, g, 2, 2)  # (b, c, d, i1, i2, h, j1, j2, w, k1, k2)
    return f.permute(0, 3, 6, 9, 4, 7, 10, 1, 2, 5, 8).reshape(b, 64 * c, g, g, g)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(B, 64 c, G, G, G) -> (B, 64 G^3, c): rows (d, h, w, i1, j1, k1, i2, j2, k2) as the decoder's upscaling."""
    b, n = packed.shape[:2]
    return packed.flatten(2).transpose(1, 2).reshape(b, -1, n // 64)


def unpack(packed: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, 64 c, G, G, G) -> (B, c, 4G, 4G, 4G)."""
    b, n = packed.shape[:2]
    c, g = n // 64, grid
    f = packed.view(b, 2, 2, 2, 2, 2, 2, c, g, g, g)  # (b, i1, j1, k1, i2, j2, k2, c, d, h, w)
    return f.permute(0, 7, 8, 1, 4, 9, 2, 5, 10, 3, 6).reshape(b, c, 4 * g, 4 * g, 4 * g)


def low_res_image(crop: torch.Tensor, stride: int) -> torch.Tensor:
    """Normalised crop (B, 1, S, S, S) averaged over stride^3 blocks: (B, 1, S/stride, ...) on the low-res grid,
    same axis order (x, y, z)."""
    return F.avg_pool3d(crop, stride) if stride > 1 else crop


def split_embedding(
    embedding: torch.Tensor, out_chans: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(B, C [+ 64 c [+ 64]], G, G, G) -> the image embedding (B, C, G, G, G), the high-res rows (B, 64 G^3, c)
    or None, and the low-res image (B, 4G, 4G, 4G) of ``hires_image`` encoders or None. c = C / 8 always
    (EncoderConfig.hires_channels), which tells the two extras apart."""
    extra = embedding.shape[1] - out_chans
    if extra == 0:
        return embedding, None, None
    c = out_chans // 8
    if extra not in (64 * c, 64 * (c + 1)):
        raise ValueError(f"embedding of {embedding.shape[1]} channels: not {out_chans} plus 64 x {c} (+ 64)")
    rows = unpack_rows(embedding[:, out_chans : out_chans + 64 * c])
    if extra == 64 * c:
        return embedding[:, :out_chans], rows, None
    image = unpack(embedding[:, out_chans + 64 * c :], embedding.shape[-1])[:, 0]
    return embedding[:, :out_chans], rows, image
