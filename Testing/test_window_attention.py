"""The de-padded window attention equals upstream's padded 14^3 attention; the rel-pos bias is upstream's.

The padded reference lives only here: it pads the normed token grid with zeros to L^3, runs q/k/v on all L^3
positions, builds the bias element by element from the SPEC.md formula and takes the softmax over every key.
"""

import torch

from MemorizingSAMLib.modeling.attention import Attention3D
from MemorizingSAMLib.modeling.relpos import real_key_bias, rel_pos_factors, relative_table


def reference_bias(q: torch.Tensor, rd, rh, rw, size: int) -> torch.Tensor:
    """q (L, L, L, hd) on the full (padded) grid -> B (L^3, L^3) by the literal upstream formula."""
    Rd, Rh, Rw = (relative_table(t, size) for t in (rd, rh, rw))
    L = size
    idx = torch.arange(L)
    i_d, i_h, i_w = torch.meshgrid(idx, idx, idx, indexing="ij")
    i_d, i_h, i_w = i_d.reshape(-1), i_h.reshape(-1), i_w.reshape(-1)
    # key coords broadcast along dim 1
    j_d, j_h, j_w = i_d[None, :], i_h[None, :], i_w[None, :]
    qi = q[i_d, i_h, i_w][:, None, :]  # (Nq, 1, hd)
    t1 = (qi * Rd[i_d[:, None], j_w]).sum(-1)
    t2 = (q[i_d[:, None], i_h[:, None], j_d] * Rh[i_h[:, None], j_w]).sum(-1)
    t3 = (q[i_d[:, None], i_h[:, None], j_h] * Rw[j_h, j_w]).sum(-1)
    return t1 + t2 + t3


def padded_reference(attn: Attention3D, x: torch.Tensor, window: int) -> torch.Tensor:
    """Upstream window-block attention on one window: zero-pad (B=1, G, G, G, C) to L^3, attend, crop."""
    g, c = x.shape[1], x.shape[-1]
    xp = torch.zeros(1, window, window, window, c, dtype=x.dtype)
    xp[:, :g, :g, :g] = x
    h, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(xp.reshape(-1, c)).view(-1, 3, h, hd)
    out = []
    for head in range(h):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        bias = reference_bias(
            q.view(window, window, window, hd), attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w, window
        )
        p = torch.softmax(attn.scale * q @ k.T + bias, dim=-1)
        out.append(p @ v)
    o = torch.cat(out, dim=-1).view(1, window, window, window, c)[:, :g, :g, :g]
    return attn.proj(o)


def _random_attention(dim, heads, size, window, seed=0):
    torch.manual_seed(seed)
    a = Attention3D(dim, heads, use_rel_pos=True, rel_pos_size=size, window_size=window).double()
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return a


def test_depadded_window_attention_equals_padded_reference():
    g, window = 4, 7
    attn = _random_attention(16, 2, window, window)
    x = torch.randn(1, g, g, g, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = attn(x)
        ref = padded_reference(attn, x, window)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0), (ours - ref).abs().max()


def test_depadded_window_attention_published_sizes():
    # SAM-Med3D window blocks: 8^3 tokens padded to 14^3 (a narrow head keeps the 2744^2 reference small).
    attn = _random_attention(8, 2, 14, 14, seed=1)
    x = torch.randn(1, 8, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ours = attn(x)
        ref = padded_reference(attn, x, 14)
    assert (ours - ref).abs().max().item() < 1e-12


def test_padding_keys_matter():
    # Guard against a reference that would pass trivially: dropping the padding keys changes the result.
    attn = _random_attention(16, 2, 7, 7, seed=2)
    x = torch.randn(1, 4, 4, 4, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = padded_reference(attn, x, 7)
        attn.window_size = 0  # now plain attention over the 4^3 real tokens with the same tables
        plain = attn(x)
    assert (plain - ref).abs().max().item() > 1e-3


def test_global_bias_matches_literal_formula():
    torch.manual_seed(3)
    g, hd = 5, 6
    q = torch.randn(1, g, g, g, hd, dtype=torch.float64)
    tabs = [torch.randn(2 * g - 1, hd, dtype=torch.float64) for _ in range(3)]
    t1, t2, t3 = rel_pos_factors(q, *tabs, size=g)
    ours = real_key_bias(t1, t2, t3, g)[0]
    ref = reference_bias(q[0], *tabs, size=g)
    assert torch.allclose(ours, ref, atol=1e-12)
    # ... and it is not the textbook decomposition, which upstream does not compute.
    Rd, Rh, Rw = (relative_table(t, g) for t in tabs)
    idx = torch.arange(g)
    a, b, c = (t.reshape(-1) for t in torch.meshgrid(idx, idx, idx, indexing="ij"))
    qf = q[0].reshape(-1, hd)
    textbook = (
        (qf[:, None] * Rd[a[:, None], a[None, :]]).sum(-1)
        + (qf[:, None] * Rh[b[:, None], b[None, :]]).sum(-1)
        + (qf[:, None] * Rw[c[:, None], c[None, :]]).sum(-1)
    )
    assert (textbook - ref).abs().max() > 1e-2
