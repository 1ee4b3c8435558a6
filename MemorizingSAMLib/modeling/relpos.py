"""The 3D decomposed relative-position bias exactly as the published SAM-Med3D / FastSAM3D code evaluates it.

Query token i = (id, ih, iw), key token j = (jd, jh, jw) on a cubic grid; q(a, b, c) is the *unscaled* query of
the token at (a, b, c) in the same head. Upstream broadcasting gives (SPEC.md section 7b)

    B(i, j) = q(id, ih, iw) . Rd[id, jw] + q(id, ih, jd) . Rh[ih, jw] + q(id, ih, jh) . Rw[jh, jw]

with R[a, b] = table[a - b + L - 1]. This is not the textbook MViTv2 bias; it is what the checkpoints were
trained with, so it is reproduced on purpose. We never build the (query, key) 6-D broadcast; we keep the three
small factors below and combine them where needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """(2*size-1, C) table -> (size, size, C) with R[a, b] = table[a - b + size - 1].

    A table of another length is first resampled to 2*size-1 rows by linear interpolation (align_corners=False),
    as upstream does; the published models never need it.
    """
    n = 2 * size - 1
    if table.shape[0] != n:
        table = F.interpolate(table.t().unsqueeze(0), size=n, mode="linear", align_corners=False)[0].t()
    idx = torch.arange(size, device=table.device)
    return table[idx[:, None] - idx[None, :] + size - 1]


def rel_pos_factors(
    q: torch.Tensor,
    table_d: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    size: int,
    pad_query: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three factors of the upstream bias.

    Args:
        q: (n, G, G, G, hd) unscaled queries of the real tokens (n = batch * heads).
        table_*: (2*size-1, hd) relative-position tables.
        size: L, the side of the attention grid (G for global blocks, the window for padded blocks, L >= G).
        pad_query: (n, hd) query of a zero (padding) token, i.e. the qkv bias' q part; needed when L > G.

    Returns:
        t1 (n, G, G, G, L): q(a,b,c) . Rd[a, jw]
        t2 (n, G, G, L, L): [a, b, x, jw] = q(a,b,x) . Rh[b, jw]   (x = the key's jd)
        t3 (n, G, G, L, L): [a, b, x, jw] = q(a,b,x) . Rw[x, jw]   (x = the key's jh)
    where q(a, b, x) for x >= G is ``pad_query``.
    """
    n, g = q.shape[0], q.shape[1]
    rd = relative_table(table_d, size)[:g]
    rh = relative_table(table_h, size)[:g]
    rw = relative_table(table_w, size)
    t1 = torch.einsum("nabcd,akd->nabck", q, rd)
    if size > g:
        if pad_query is None:
            raise ValueError("pad_query is required when the attention grid is padded")
        q_ext = torch.cat([q, pad_query[:, None, None, None, :].expand(n, g, g, size - g, -1)], dim=3)
    else:
        q_ext = q
    t2 = torch.einsum("nabxd,bkd->nabxk", q_ext, rh)
    t3 = torch.einsum("nabxd,xkd->nabxk", q_ext, rw)
    return t1, t2, t3


def real_key_bias(t1: torch.Tensor, t2: torch.Tensor, t3: torch.Tensor, g: int) -> torch.Tensor:
    """Bias between real queries and real keys: (n, G^3, G^3), key index 64*jd + 8*jh + jw style (C order)."""
    n = t1.shape[0]
    bias = t1[:, :, :, :, None, None, :g] + t2[:, :, :, None, :g, None, :g] + t3[:, :, :, None, None, :g, :g]
    return bias.reshape(n, g**3, g**3)


def padded_key_logmass(t1: torch.Tensor, t2: torch.Tensor, t3: torch.Tensor, g: int) -> torch.Tensor:
    """log of sum over the padding keys of exp(bias), per real query: (n, G, G, G).

    A padding key (jd, jh, jw) has at least one coordinate >= G. Its bias factorises over (jd, jh) given jw, so
    the sum over the L^3 - G^3 padding keys is, per jw,
        jw >= G: (sum_jd e^t2) * (sum_jh e^t3)
        jw <  G: (sum_{jd>=G} e^t2) * (sum_{all jh} e^t3) + (sum_{jd<G} e^t2) * (sum_{jh>=G} e^t3)
    computed in log space. The content term s*q.b_k, the same for every padding key, is added by the caller.
    """
    lse2_all = torch.logsumexp(t2, dim=3)  # (n, G, G, L) over jd
    lse2_pad = torch.logsumexp(t2[:, :, :, g:], dim=3)
    lse2_real = torch.logsumexp(t2[:, :, :, :g], dim=3)
    lse3_all = torch.logsumexp(t3, dim=3)
    lse3_pad = torch.logsumexp(t3[:, :, :, g:], dim=3)
    log_phi_inner = torch.logaddexp(lse2_pad + lse3_all, lse2_real + lse3_pad)[..., :g]
    log_phi_outer = (lse2_all + lse3_all)[..., g:]
    log_phi = torch.cat([log_phi_inner, log_phi_outer], dim=-1)  # (n, G, G, L)
    return torch.logsumexp(t1 + log_phi[:, :, :, None, :], dim=-1)
