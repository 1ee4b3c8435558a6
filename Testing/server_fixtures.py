"""What the server tests share: a small volume with a bright box, a small perturbed model checkpoint, a
self-signed certificate for 127.0.0.1."""

import subprocess

import numpy as np
import torch

from MemorizingSAMLib.checkpoints import save_checkpoint
from MemorizingSAMLib.modeling import build_sam3d


def volume(seed=0):
    """(24, 48, 56) [k, j, i] noise around 100 with a box of +300 (voxels k 6-17, j 12-35, i 14-39)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(100, 10, (24, 48, 56)).astype(np.float32)
    v[6:18, 12:36, 14:40] += 300
    return v


def tiny_checkpoint(folder):
    """memsam_tiny_student with its weights moved off initialisation (so masks are not empty), saved."""
    torch.manual_seed(0)
    m = build_sam3d("memsam_tiny_student")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(m, folder / "tiny.pt")


def self_signed(folder, name="server"):
    """(certificate, key) PEM files for CN=localhost, IP 127.0.0.1, made by openssl."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
