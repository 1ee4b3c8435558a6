"""Model definitions: the 3D ViT encoder, prompt encoder, mask decoder and their composition."""

from .config import (
    CONFIGS,
    EncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    Sam3DConfig,
    fastsam3d,
    get_config,
    sam_med3d_vit_b,
)
from .sam3d import Sam3D, build_sam3d

__all__ = [
    "CONFIGS",
    "EncoderConfig",
    "MaskDecoderConfig",
    "PromptEncoderConfig",
    "Sam3D",
    "Sam3DConfig",
    "build_sam3d",
    "fastsam3d",
    "get_config",
    "sam_med3d_vit_b",
]
