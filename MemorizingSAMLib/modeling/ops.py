"""Small tensor operations shared by the encoder, prompt encoder and decoder.

Convolutions whose kernel equals their stride are matrix products on non-overlapping patches; written that way on
channel-last tensors they avoid the slow generic 3D (transposed) convolution paths of CPU backends and the
permutes around them. The weights keep the layout of the nn.Conv3d / nn.ConvTranspose3d modules that own them,
so state-dict keys and shapes stay those of the published checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed_linear import Linear


def patchify(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D/k, H/k, W/k, C*k^3), patch entries ordered (c, kd, kh, kw) like Conv3d weights."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // k, k, h // k, k, w // k, k)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, d // k, h // k, w // k, c * k * k * k)


def patchify_channels_last(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, D/k, H/k, W/k, C*k^3), entries ordered (c, kd, kh, kw)."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // k, k, h // k, k, w // k, k, c)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, d // k, h // k, w // k, c * k * k * k)


def conv_stride_eq_kernel(x_cl: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """Conv3d with kernel == stride (no padding) on a channel-last (B, D, H, W, C) tensor -> channel-last output."""
    k = conv.kernel_size[0]
    w = conv.weight.reshape(conv.out_channels, -1)
    if k == 1:
        return F.linear(x_cl, w, conv.bias)
    return F.linear(patchify_channels_last(x_cl, k), w, conv.bias)


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a 3D feature map (biased variance), parameters ``weight``/``bias``.

    Stored like the upstream LayerNorm3d; applied with :func:`torch.nn.functional.layer_norm` on channel-last
    tensors, which is the same arithmetic.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, D, H, W)
        return self.forward_channels_last(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear with the upstream key names ``lin1`` / ``lin2``."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(dim, hidden)
        self.lin2 = Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them, keys ``layers.N`` (hypernetworks, IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
