"""Model configurations as dataclasses.

Every published architecture has a named config whose fields reproduce the upstream constructor arguments; our
own small models are further named configs. A config is plain data (ints, floats, strings, tuples) so that it can
be stored inside our checkpoint files and loaded back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Block variants of the 3D ViT encoder.
#   "pre_norm":  SAM-Med3D Block3D         y = x + Attn(LN1(x)); out = y + MLP(LN2(y))
#   "post_norm": FastSAM3D Block3D         z = LN2(x + Attn(LN1(x))); out = z + MLP(z)
#   attention-free blocks (FastSAM3D's first ``attention_free_blocks``): z = LN2(x); out = z + MLP(z)
BLOCK_VARIANTS = ("pre_norm", "post_norm")
# "dense": exact attention over all tokens (the only backend allowed for published checkpoints).
# "grouped": our sparse backend: attention inside token groups (see modeling/sparse_attention.py).
ATTENTION_BACKENDS = ("dense", "grouped")


@dataclass(frozen=True)
class EncoderConfig:
    """3D ViT image encoder. Input (B, 1, S, S, S) with S = ``img_size``; output (B, out_chans, S/p, S/p, S/p)."""

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 384
    qkv_bias: bool = True
    use_rel_pos: bool = True
    # Window size in tokens for the non-global blocks; 0 means every block attends globally.
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    block_variant: str = "pre_norm"
    # The first ``attention_free_blocks`` blocks have no attention (FastSAM3D's ``skip_layer``).
    attention_free_blocks: int = 0
    attention_backend: str = "dense"
    # For the "grouped" backend: group edge in tokens; blocks alternate contiguous and dilated groups.
    sparse_group: int = 2
    # A learned per-head local/memory mixing gate in every attention block (our trained models only).
    memory_gate: bool = False
    # Mask-aware memory values (our trained models only): a retrieved reference token's value gets
    # f * e_h added, f the foreground fraction of its patch in the reference's segmentation and e_h a learned
    # per-head vector, so that memory says what was segmented, not only what the reference looked like.
    memory_mask_values: bool = False
    # A learned per-head logit bonus for the memory token at the query's own grid position (our trained models
    # only): references are crops centred on a structure as this crop is on a click, so "the same place in the
    # reference" is informative; 0 gives plain content attention.
    memory_position_bias: bool = False
    # A direct route from the retrieved masks to the image embedding (our trained models only): the weighted
    # foreground fractions of the retrieved entries, mirror-symmetrised, times a learned per-channel vector, added
    # to the embedding after the neck.
    memory_prior_embedding: bool = False
    # How memory entries are retrieved (modeling/memory_attention.py lists the kinds).
    memory_descriptor: str = "token_mean_std_random_projection"
    # High-resolution image features for the mask head (our trained models only, as HQ-SAM and SAM 2 feed early
    # features to theirs): a small convolutional stem maps the crop to out_chans/8 channels on the low-res logit
    # grid (4G^3), which enter the decoder's second upscaling before its GELU, so that masks can follow image edges
    # inside a token. They travel packed behind the embedding's out_chans channels (see hires.py).
    hires_features: bool = False
    # The normalised crop itself averaged onto the low-res grid, packed as 64 more channels behind the high-res
    # features (hires.py), for the mask head's geodesic click maps (click_maps.py). Needs hires_features.
    hires_image: bool = False

    @property
    def hires_channels(self) -> int:
        """Channels of the high-resolution features (0 without them)."""
        return self.out_chans // 8 if self.hires_features else 0

    @property
    def embedding_channels(self) -> int:
        """Channels of what :meth:`ImageEncoder3D.forward` returns: out_chans, plus 64 per high-res channel, plus
        64 for the low-res image."""
        return self.out_chans + 64 * self.hires_channels + 64 * self.hires_image

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def is_windowed(self, block_index: int) -> bool:
        return self.window_size > 0 and block_index not in self.global_attn_indexes

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.block_variant not in BLOCK_VARIANTS:
            raise ValueError(f"block_variant must be one of {BLOCK_VARIANTS}, got {self.block_variant!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not 0 <= self.attention_free_blocks <= self.depth:
            raise ValueError(f"attention_free_blocks {self.attention_free_blocks} outside [0, {self.depth}]")
        if self.window_size and self.window_size < self.grid:
            # Several windows per axis would need a per-window closed form for the padding; the published
            # models (window 14 over an 8^3 grid) never need it.
            raise ValueError(f"window_size {self.window_size} smaller than the token grid {self.grid} is not supported")
        if self.attention_backend == "grouped":
            if self.use_rel_pos or self.window_size:
                raise ValueError("the grouped sparse backend needs use_rel_pos=False and window_size=0")
            if self.grid % self.sparse_group:
                raise ValueError(f"grid {self.grid} is not divisible by sparse_group {self.sparse_group}")
        if self.hires_features and (self.patch_size % 4 or self.out_chans % 8):
            raise ValueError(
                f"hires_features needs patch_size divisible by 4 and out_chans by 8, got {self.patch_size} and "
                f"{self.out_chans}"
            )
        if self.hires_image and not self.hires_features:
            raise ValueError("hires_image needs hires_features (it travels packed behind them)")


@dataclass(frozen=True)
class PromptEncoderConfig:
    """Prompt encoder: points -> sparse tokens, low-res mask (B,1,4G,4G,4G) -> dense (B,embed_dim,G,G,G)."""

    embed_dim: int = 384
    image_embedding_size: int = 8
    input_image_size: int = 128
    mask_in_chans: int = 16
    num_point_embeddings: int = 2


@dataclass(frozen=True)
class MaskDecoderConfig:
    """Two-way transformer mask decoder giving (B, M, 4G, 4G, 4G) low-res logits and (B, M) IoU predictions."""

    transformer_dim: int = 384  # = the encoder's out_chans and the prompt encoder's embed_dim
    depth: int = 2  # two-way transformer blocks
    num_heads: int = 8
    mlp_dim: int = 2048  # the token MLP's hidden width
    # Cross-attentions with the image tokens project to transformer_dim / this (SAM's "downsample rate").
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3  # mask tokens besides the single-mask one
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Our configs only: include/exclude clicks and the previous mask drawn on the low-res grid and added to the
    # high-resolution mask-head rows (click_maps.py); needs EncoderConfig.hires_features.
    click_maps: bool = False
    # With click_maps: also geodesic maps of the clicks over the low-res image (click_maps.py, geodesic.py); needs
    # EncoderConfig.hires_image.
    geodesic_click_maps: bool = False


@dataclass(frozen=True)
class Sam3DConfig:
    """A whole interactive model plus the model-space conventions its checkpoints were trained with."""

    name: str = "sam_med3d_vit_b"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    # Model space: isotropic voxel spacing of the crop in mm, intensity normalisation of the crop, and the raw
    # intensity given to crop voxels outside the image (upstream: z-score over voxels > 0, padding 0).
    spacing_mm: float = 1.5
    normalization: str = "zscore_positive"
    pad_value: float = 0.0
    # Memory attention (Memorizing SAM): the encoder block whose keys/values memory banks hold by default.
    memory_layer: int = -1

    def validate(self) -> None:
        self.encoder.validate()
        pe, md, enc = self.prompt_encoder, self.mask_decoder, self.encoder
        if pe.embed_dim != enc.out_chans or md.transformer_dim != enc.out_chans:
            raise ValueError("prompt/decoder embedding dims must equal the encoder's out_chans")
        if pe.image_embedding_size != enc.grid or pe.input_image_size != enc.img_size:
            raise ValueError("prompt encoder grid/input size must match the encoder")
        if md.click_maps and not enc.hires_features:
            raise ValueError("mask_decoder.click_maps needs encoder.hires_features (the rows they are added to)")
        if md.geodesic_click_maps and not (md.click_maps and enc.hires_image):
            raise ValueError("mask_decoder.geodesic_click_maps needs click_maps and encoder.hires_image")
        if self.memory_layer >= enc.depth:
            raise ValueError(f"memory_layer {self.memory_layer} >= encoder depth {enc.depth}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sam3DConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so that a newer file is not misread."""

        def build(klass, data):
            known = {f.name for f in fields(klass)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            kwargs = {}
            for f in fields(klass):
                if f.name not in data:
                    continue
                value = data[f.name]
                if f.name == "encoder":
                    value = build(EncoderConfig, value)
                elif f.name == "prompt_encoder":
                    value = build(PromptEncoderConfig, value)
                elif f.name == "mask_decoder":
                    value = build(MaskDecoderConfig, value)
                elif isinstance(value, list):
                    value = tuple(value)
                kwargs[f.name] = value
            return klass(**kwargs)

        cfg = build(cls, d)
        cfg.validate()
        return cfg


def sam_med3d_vit_b() -> Sam3DConfig:
    """SAM-Med3D ViT-B (``vit_b_ori``; also its turbo checkpoint): 12 pre-norm blocks, window 14, 100,509,232 params."""
    return Sam3DConfig(name="sam_med3d_vit_b")


def fastsam3d() -> Sam3DConfig:
    """FastSAM3D: 6 post-norm blocks, 6 heads, global attention, first 2 blocks attention-free; 53,224,240 params."""
    enc = EncoderConfig(
        depth=6,
        num_heads=6,
        window_size=0,
        global_attn_indexes=(),
        block_variant="post_norm",
        attention_free_blocks=2,
    )
    return Sam3DConfig(name="fastsam3d", encoder=enc, memory_layer=4)  # the paper's memory layer


def memsam_small_teacher() -> Sam3DConfig:
    """Our small teacher, trained here: 64^3 crop at 1.5 mm (96 mm field of view), patch 8 (8^3 tokens as the
    published models), 6 pre-norm blocks of width 192 with global rel-pos attention, a 96-wide decoder."""
    enc = EncoderConfig(
        img_size=64,
        patch_size=8,
        embed_dim=192,
        depth=6,
        num_heads=6,
        out_chans=96,
        window_size=0,
        global_attn_indexes=(),
        block_variant="pre_norm",
    )
    return Sam3DConfig(
        name="memsam_small_teacher",
        encoder=enc,
        prompt_encoder=PromptEncoderConfig(embed_dim=96, input_image_size=64, mask_in_chans=16),
        mask_decoder=MaskDecoderConfig(transformer_dim=96, num_heads=4, mlp_dim=384, iou_head_hidden_dim=96),
        memory_layer=5,
    )


def memsam_tiny_student() -> Sam3DConfig:
    """Our student, distilled layer by layer from :func:`memsam_small_teacher` (student block i <- teacher block
    2i+1): 3 FastSAM3D-style post-norm blocks, the first attention-free; memory layer 2."""
    t = memsam_small_teacher()
    enc = EncoderConfig(
        **{
            **asdict(t.encoder),
            "depth": 3,
            "block_variant": "post_norm",
            "attention_free_blocks": 1,
            "global_attn_indexes": (),
        }
    )
    return Sam3DConfig(**{**t.__dict__, "name": "memsam_tiny_student", "encoder": enc, "memory_layer": 2})


def memsam_tiny_sparse() -> Sam3DConfig:
    """The tiny student with the grouped sparse attention backend instead of dense rel-pos attention."""
    base = memsam_tiny_student()
    enc = EncoderConfig(**{**asdict(base.encoder), "use_rel_pos": False, "attention_backend": "grouped"})
    return Sam3DConfig(**{**base.__dict__, "name": "memsam_tiny_sparse", "encoder": enc})


def memsam_tiny_memory() -> Sam3DConfig:
    """The tiny student with learned memory gates, mask-aware memory values and a same-position memory bias,
    fine-tuned with memory attention active (training/memory_finetune.py)."""
    base = memsam_tiny_student()
    enc = EncoderConfig(
        **{
            **asdict(base.encoder),
            "memory_gate": True,
            "memory_mask_values": True,
            "memory_position_bias": True,
            "memory_prior_embedding": True,
            "memory_descriptor": "mirror_pooled_random_projection",
        }
    )
    return Sam3DConfig(**{**base.__dict__, "name": "memsam_tiny_memory", "encoder": enc})


def memsam_hq_teacher() -> Sam3DConfig:
    """:func:`memsam_small_teacher` with high-resolution image features in the mask head (hires.py)."""
    t = memsam_small_teacher()
    enc = EncoderConfig(**{**asdict(t.encoder), "hires_features": True})
    return Sam3DConfig(**{**t.__dict__, "name": "memsam_hq_teacher", "encoder": enc})


def memsam_hq_student() -> Sam3DConfig:
    """:func:`memsam_tiny_student` with the high-resolution mask-head features, distilled from
    :func:`memsam_hq_teacher`."""
    s = memsam_tiny_student()
    enc = EncoderConfig(**{**asdict(s.encoder), "hires_features": True})
    return Sam3DConfig(**{**s.__dict__, "name": "memsam_hq_student", "encoder": enc})


def memsam_hq_memory() -> Sam3DConfig:
    """:func:`memsam_tiny_memory` with the high-resolution mask-head features: the shipped default's config."""
    m = memsam_tiny_memory()
    enc = EncoderConfig(**{**asdict(m.encoder), "hires_features": True})
    return Sam3DConfig(**{**m.__dict__, "name": "memsam_hq_memory", "encoder": enc})


def memsam_hq_clicks() -> Sam3DConfig:
    """:func:`memsam_hq_memory` with click maps in the mask head (click_maps.py)."""
    m = memsam_hq_memory()
    md = MaskDecoderConfig(**{**asdict(m.mask_decoder), "click_maps": True})
    return Sam3DConfig(**{**m.__dict__, "name": "memsam_hq_clicks", "mask_decoder": md})


def memsam_hq_geo() -> Sam3DConfig:
    """:func:`memsam_hq_clicks` with geodesic click maps over the low-res image (click_maps.py)."""
    m = memsam_hq_clicks()
    enc = EncoderConfig(**{**asdict(m.encoder), "hires_image": True})
    md = MaskDecoderConfig(**{**asdict(m.mask_decoder), "geodesic_click_maps": True})
    return Sam3DConfig(**{**m.__dict__, "name": "memsam_hq_geo", "encoder": enc, "mask_decoder": md})


CONFIGS = {
    "sam_med3d_vit_b": sam_med3d_vit_b,
    "fastsam3d": fastsam3d,
    "memsam_small_teacher": memsam_small_teacher,
    "memsam_tiny_student": memsam_tiny_student,
    "memsam_tiny_sparse": memsam_tiny_sparse,
    "memsam_tiny_memory": memsam_tiny_memory,
    "memsam_hq_teacher": memsam_hq_teacher,
    "memsam_hq_student": memsam_hq_student,
    "memsam_hq_memory": memsam_hq_memory,
    "memsam_hq_clicks": memsam_hq_clicks,
    "memsam_hq_geo": memsam_hq_geo,
}


def get_config(name: str) -> Sam3DConfig:
    """Named config; a clear error lists the known names."""
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}") from None
