"""Helpers shared by the click-map tests: small models with random (non-zero) weights, decoding, a session mask."""

from __future__ import annotations

import numpy as np
import torch

from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.session import InteractiveSession


def perturbed(name: str, seed: int = 0):
    """An eval-mode model of config ``name`` whose matrices are N(0, 0.05): every path carries signal."""
    torch.manual_seed(seed)
    m = build_sam3d(name).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return m


def logits(m, emb, pts, labs, prev, prepared=False) -> torch.Tensor:
    """Low-res logits of one decode, on the plain or the prepared path."""
    with torch.no_grad():
        return m.decode(m.prepare_embedding(emb) if prepared else emb, pts, labs, prev)[0]


def session_mask(model, image_path) -> np.ndarray:
    """The mask a session gives for one include click at voxel (20, 20, 17) of the image file."""
    session = InteractiveSession(model)
    session.set_image(str(image_path))
    session.add_segment("s")
    session.add_point(np.array([20.0, 20.0, 17.0]))
    return session.mask()
