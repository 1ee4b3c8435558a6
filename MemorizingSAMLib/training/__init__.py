"""Training: SAM-Med3D-style interactive loop, layer-wise progressive distillation (FastSAM3D)."""
