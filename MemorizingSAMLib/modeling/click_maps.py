"""Click maps in the mask head (our configs with ``MaskDecoderConfig.click_maps``).

The published decoders know where a click is only through its prompt token, which reaches the mask through the
8^3 image tokens (24 mm apart in the published models' space, 12 mm in ours) and one hypernetwork vector for the
whole crop: a correction can change the mask only as much as the tokens around it can. The shipped model left 83 %
of its corrections where they were placed (docs/training.md, "Later clicks"). Here each decode also draws the
clicks on the low-res logit grid, as Gaussians around include and exclude clicks at two widths, plus the previous
mask, and a pointwise convolution adds them to the high-resolution rows of the mask head (hires.py) before its
last GELU: voxel by voxel, next to the image features that say whether a voxel looks like the clicked structure.

With ``geodesic`` (config memsam_hq_geo) four more maps say which voxels a click reaches without crossing an
edge: per include and per exclude clicks, exp(-e / s) for s in GEODESIC_SCALES, e the geodesic excess: the
geodesic distance over the low-res image (geodesic.py) minus the city-block distance, i.e. the intensity change
(times GEODESIC_LAMBDA) that the cheapest path from the nearest click has to cross. Inside a homogeneous region
e stays near 0 however far the voxel is; beyond an edge it jumps. This is region growing's cue, given to the head
voxel by voxel; on the held-out phantoms the best threshold of e alone from click 1 reaches Dice 0.77 (model 0.53).

The convolution starts at zero, so a model converted to a click-map config gives its old logits until trained;
the geodesic channels extend a converted click-map head with zero columns (:func:`widen_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from .geodesic import FAR, geodesic_distance
from .hires import pack, unpack_rows

# Gaussian widths in low-res voxels (3 and 9 mm for our 1.5 mm, 64^3 crops): one that marks the clicked voxel,
# one that reaches across a small structure.
SIGMAS_LOW_RES = (1.0, 3.0)
N_CHANNELS = 2 * len(SIGMAS_LOW_RES) + 1
# Geodesic maps: intensity change weight per low-res step, in units of the normalised crop (z-scores), and the
# scales of the excess in low-res steps. lam 4 and thresholds 1-3 separated the held-out phantoms best
# (session 15; the excess scales nearly linearly with lam, so one lam with two scales covers the range).
GEODESIC_LAMBDA = 4.0
GEODESIC_SCALES = (2.0, 6.0)
N_GEODESIC = 2 * len(GEODESIC_SCALES)


def n_channels(geodesic: bool) -> int:
    """Input channels of the click-map head."""
    return N_CHANNELS + (N_GEODESIC if geodesic else 0)


@torch.no_grad()  # inputs of the head, like the image: nothing to learn through them
def geodesic_channels(
    points: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, crop_size: int, rounds: int = 2
) -> torch.Tensor:
    """(B, 4, L, L, L): per include clicks then per exclude clicks, exp(-e / s) for s in GEODESIC_SCALES, where e
    is the geodesic excess from the low-res voxels holding the clicks (module docstring); 0 where a side has no
    click. ``points`` (B or 1, N, 3) crop voxel coordinates (x, y, z) of a ``crop_size``^3 crop, ``labels`` (B or
    1, N) 1 / 0 / -1 ignored, ``image`` (B or 1, L, L, L) the low-res image in the same axis order."""
    low_res = image.shape[-1]
    b = max(points.shape[0], image.shape[0])
    points, labels = points.expand(b, -1, -1), labels.expand(b, -1)
    image = image.expand(b, -1, -1, -1)
    dt = image.dtype
    scale = low_res / crop_size
    idx = ((points.to(image.device, dt) + 0.5) * scale - 0.5).round().clamp_(0, low_res - 1).long()  # (B, N, 3)
    seeds = torch.zeros(b, 2, low_res, low_res, low_res, dtype=torch.bool, device=image.device)
    lab = labels.to(image.device)
    for side, value in enumerate((1, 0)):
        bi, ni = torch.nonzero(lab == value, as_tuple=True)
        seeds[bi, side, idx[bi, ni, 0], idx[bi, ni, 1], idx[bi, ni, 2]] = True
    excess = geodesic_distance(image, seeds, GEODESIC_LAMBDA, rounds) - _city_block(idx, lab, low_res)
    has = seeds.flatten(2).any(-1)[..., None, None, None]  # (B, 2, 1, 1, 1)
    excess = torch.where(has, excess.clamp_(min=0), FAR)
    out = [torch.exp(excess / -s) for s in GEODESIC_SCALES]  # each (B, 2, L, L, L)
    return torch.stack(out, 2).flatten(1, 2)  # (B, 2 * S, L, L, L): include s1, s2, exclude s1, s2


def click_map_channels(
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    low_res: int,
    crop_size: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    image: torch.Tensor | None = None,
) -> torch.Tensor:
    """The maps (B, 5, L, L, L) on the low-res grid, spatial axes in the points' order (x, y, z):
    per include and per exclude clicks, the sum over them of exp(-d^2 / 2 sigma^2), capped at 1, for each sigma of
    SIGMAS_LOW_RES (d in low-res voxels between the voxel's centre and the click), then sigmoid(previous logits)
    - 0.5 (0 without a mask prompt).

    ``points`` (B, N, 3) are crop voxel coordinates (x, y, z) of a ``crop_size``^3 crop, ``labels`` (B, N) 1
    include / 0 exclude / -1 ignored; ``mask_input`` (B or 1, 1, L, L, L) raw logits or None. With ``image`` (B
    or 1, L, L, L), the low-res image, 4 geodesic channels follow (:func:`geodesic_channels`)."""
    n_sig = len(SIGMAS_LOW_RES)
    n_out = n_channels(image is not None)
    out = torch.zeros(batch, n_out, low_res, low_res, low_res, dtype=dtype, device=device)
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
        if image is not None:
            out[:, N_CHANNELS:] = geodesic_channels(points, labels, image.detach().to(device, dtype), crop_size)
    if mask_input is not None:
        out[:, N_CHANNELS - 1] = torch.sigmoid(mask_input[:, 0].to(dtype)) - 0.5
    return out


CONV_WEIGHT = "mask_decoder.click_maps.conv.weight"


def widen_state(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a click-map head of fewer input channels than ``target``'s widened by zero columns (the
    geodesic channels), so that the converted model gives the same logits until trained; other keys as they are."""
    w, t = state.get(CONV_WEIGHT), target.get(CONV_WEIGHT)
    if w is None or t is None or w.shape == t.shape:
        return state
    if w.shape[0] != t.shape[0] or w.shape[1] > t.shape[1] or w.shape[2:] != t.shape[2:]:
        raise ValueError(f"click-map head {tuple(w.shape)} cannot widen to {tuple(t.shape)}")
    wide = torch.zeros(t.shape, dtype=w.dtype, device=w.device)
    wide[:, : w.shape[1]] = w
    return {**state, CONV_WEIGHT: wide}


def _city_block(idx: torch.Tensor, labels: torch.Tensor, low_res: int) -> torch.Tensor:
    """(B, 2, L, L, L) city-block distances from the include / exclude clicks' low-res voxels ``idx`` (B, N, 3),
    in closed form (the lam = 0 geodesic distance, which the sweeps reach exactly: test_geodesic.py); FAR for a
    side without clicks."""
    r = torch.arange(low_res, device=idx.device)
    ax = [(r - idx[..., a, None]).abs().to(torch.float32) for a in range(3)]  # each (B, N, L)
    d = ax[0][..., :, None, None] + ax[1][..., None, :, None] + ax[2][..., None, None, :]  # (B, N, L, L, L)
    out = []
    for value in (1, 0):
        far = torch.where(labels == value, 0.0, FAR)[..., None, None, None]
        out.append((d + far).amin(1).clamp_(max=FAR) if d.shape[1] else d.new_full(d.shape[:1] + d.shape[2:], FAR))
    return torch.stack(out, 1)


class ClickMaps(nn.Module):
    """Click maps -> rows (B, 64 G^3, channels) to add to the mask head's high-resolution rows (hires.py)."""

    def __init__(self, channels: int, geodesic: bool = False) -> None:
        super().__init__()
        self.geodesic = geodesic
        self.conv = nn.Conv3d(n_channels(geodesic), channels, kernel_size=1)
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
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``image`` (B or 1, 4G, 4G, 4G): the low-res image, required with ``geodesic``."""
        if self.geodesic and image is None:
            raise ValueError("geodesic click maps need the low-res image")
        w = self.conv.weight
        n = w.shape[1]
        image = image if self.geodesic else None
        maps = click_map_channels(points, labels, mask_input, 4 * grid, crop_size, batch, w.dtype, w.device, image)
        # Into the high-res rows' order (hires.py) with one cached gather (a 10-D permute costs several times
        # more), then the pointwise convolution as a product on its channels.
        rows = maps.view(batch, -1).index_select(1, self._row_index(grid, n, w.device)).view(batch, -1, n)
        return torch.nn.functional.linear(rows, w.flatten(1), self.conv.bias)

    def _row_index(self, grid: int, n: int, device: torch.device) -> torch.Tensor:
        """Flat index into (n, 4G, 4G, 4G) maps giving (64 G^3, n) rows in hires.pack's order; cached per grid."""
        key = (grid, n, str(device))
        cache = self.__dict__.setdefault("_index_cache", {})
        if key not in cache:
            with torch.inference_mode(False):
                src = torch.arange(n * 64 * grid**3, device=device).view(1, n, *[4 * grid] * 3)
                cache[key] = unpack_rows(pack(src, grid)).reshape(-1).contiguous()
        return cache[key]
