"""Click maps in the mask head (our configs with ``MaskDecoderConfig.click_maps``).

The published decoders know where a click is only through its prompt token, which reaches the mask through the
8^3 image tokens (24 mm apart in the published models' space, 12 mm in ours) and one hypernetwork vector for the
whole crop: a correction can change the mask only as much as the tokens around it can. The shipped model left 83 %
of its corrections where they were placed (docs/training.md, "Later clicks"). Here each decode also draws the
clicks on the low-res logit grid, as Gaussians around include and exclude clicks at two widths, plus the previous
mask, and a pointwise convolution adds them to the high-resolution rows of the mask head (hires.py) before its
last GELU: voxel by voxel, next to the image features that say whether a voxel looks like the clicked structure.

The convolution starts at zero, so a model converted to a click-map config gives its old logits until trained.
"""

from __future__ import annotations

import torch
from torch import nn

from .hires import pack, unpack_rows

# Gaussian widths in low-res voxels (3 and 9 mm for our 1.5 mm, 64^3 crops): one that marks the clicked voxel,
# one that reaches across a small structure.
SIGMAS_LOW_RES = (1.0, 3.0)
N_CHANNELS = 2 * len(SIGMAS_LOW_RES) + 1


def click_map_channels(
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    low_res: int,
    crop_size: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The maps (B, 5, L, L, L) on the low-res grid, spatial axes in the points' order (x, y, z):
    per include and per exclude clicks, the sum over them of exp(-d^2 / 2 sigma^2), capped at 1, for each sigma of
    SIGMAS_LOW_RES (d in low-res voxels between the voxel's centre and the click), then sigmoid(previous logits)
    - 0.5 (0 without a mask prompt).

    ``points`` (B, N, 3) are crop voxel coordinates (x, y, z) of a ``crop_size``^3 crop, ``labels`` (B, N) 1
    include / 0 exclude / -1 ignored; ``mask_input`` (B or 1, 1, L, L, L) raw logits or None."""
    n_sig = len(SIGMAS_LOW_RES)
    out = torch.zeros(batch, N_CHANNELS, low_res, low_res, low_res, dtype=dtype, device=device)
    if points is not None and points.shape[1]:
        scale = low_res / crop_size
        # A crop voxel index p has its centre at p + 0.5 crop voxels, i.e. (p + 0.5) * scale low-res voxels, and
        # low-res voxel v at v + 0.5.
        p = (points.to(device, dtype) + 0.5) * scale - 0.5  # (B, N, 3) in low-res voxel indices
        r = torch.arange(low_res, dtype=dtype, device=device)
        d2 = (r - p[..., None]) ** 2  # (B, N, 3, L)
        inv = torch.tensor([-0.5 / s**2 for s in SIGMAS_LOW_RES], dtype=dtype, device=device)
        g = torch.exp(d2[:, None] * inv[None, :, None, None, None])  # (B, S, N, 3, L): separable Gaussians
        lab = labels.to(device)
        sel = torch.stack([(lab == 1), (lab == 0)], 1).to(dtype)  # (B, 2, N): include, exclude
        gx = g[:, None, :, :, 0] * sel[:, :, None, :, None]  # (B, 2, S, N, L), ignored clicks at 0
        gxy = gx[..., :, None] * g[:, None, :, :, 1, None, :]  # (B, 2, S, N, L, L)
        nb, n = batch if gxy.shape[0] == 1 else gxy.shape[0], gxy.shape[3]
        # Sum over clicks as one batched product (capped at 1): N L^3 multiply-adds per map, no (N, L^3) tensor.
        lhs = gxy.reshape(-1, n, low_res * low_res).transpose(1, 2)
        rhs = g[:, None, :, :, 2].expand(gxy.shape[0], 2, n_sig, n, low_res).reshape(-1, n, low_res)
        maps = torch.bmm(lhs, rhs).view(gxy.shape[0], 2 * n_sig, low_res, low_res, low_res).clamp_(max=1)
        out[:, : 2 * n_sig] = maps.expand(nb, -1, -1, -1, -1)
    if mask_input is not None:
        out[:, -1] = torch.sigmoid(mask_input[:, 0].to(dtype)) - 0.5
    return out


class ClickMaps(nn.Module):
    """Click maps -> rows (B, 64 G^3, channels) to add to the mask head's high-resolution rows (hires.py)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(N_CHANNELS, channels, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        grid: int,
        crop_size: int,
        batch: int,
    ) -> torch.Tensor:
        w = self.conv.weight
        maps = click_map_channels(points, labels, mask_input, 4 * grid, crop_size, batch, w.dtype, w.device)
        # Into the high-res rows' order (hires.py) with one cached gather (a 10-D permute costs several times
        # more), then the pointwise convolution as a product on 5 channels.
        rows = maps.view(batch, -1).index_select(1, self._row_index(grid, w.device)).view(batch, -1, N_CHANNELS)
        return torch.nn.functional.linear(rows, w.flatten(1), self.conv.bias)

    def _row_index(self, grid: int, device: torch.device) -> torch.Tensor:
        """Flat index into (5, 4G, 4G, 4G) maps giving (64 G^3, 5) rows in hires.pack's order; cached per grid."""
        key = (grid, str(device))
        cache = self.__dict__.setdefault("_index_cache", {})
        if key not in cache:
            with torch.inference_mode(False):
                src = torch.arange(N_CHANNELS * 64 * grid**3, device=device).view(1, N_CHANNELS, *[4 * grid] * 3)
                cache[key] = unpack_rows(pack(src, grid)).reshape(-1).contiguous()
        return cache[key]
