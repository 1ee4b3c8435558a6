"""Safe checkpoint loading, architecture detection from keys and shapes, and our own checkpoint format.

Accepted files:
- upstream SAM-Med3D / FastSAM3D training files: ``{'model_state_dict': ..., 'args': argparse.Namespace, ...}``;
- a bare state dict (``{key: tensor}``), full-model (``image_encoder.*`` ...) or encoder-only (``blocks.*``);
- ours: ``{'format': 'memorizingsam', 'format_version': 1, 'config': {...}, 'model_state_dict': ...}``.

Everything is read with ``torch.load(weights_only=True)``; the only classes a file may pickle beyond tensors and
plain containers are those in :data:`ALLOWED_GLOBALS` (argparse.Namespace, which upstream stores as ``args``, and
numpy scalars/dtypes, which training scripts store in their metric lists). Nothing is ever unpickled freely.

The model is only built after the whole file has been checked against the expected keys and shapes, so a failed
load leaves nothing half-loaded.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write
from .modeling.config import CONFIGS, EncoderConfig, MaskDecoderConfig, PromptEncoderConfig, Sam3DConfig
from .modeling.sam3d import Sam3D

FORMAT_NAME = "memorizingsam"
FORMAT_VERSION = 1
_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why in one or a few lines."""


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray.scalar, np.dtype]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_):
        out.append(type(np.dtype(t)))
    return out


ALLOWED_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_globals()]


def _summarise_keys(keys: list[str], limit: int = 6) -> str:
    """Group keys that differ only by numbers: 'image_encoder.blocks.#.attn.qkv.weight (x12)'."""
    groups: dict[str, int] = {}
    for k in keys:
        pat = re.sub(r"\.\d+\.", ".#.", k)
        groups[pat] = groups.get(pat, 0) + 1
    items = [f"{p} (x{n})" if n > 1 else p for p, n in groups.items()]
    more = f", ... {len(items) - limit} more patterns" if len(items) > limit else ""
    return f"{len(keys)} keys: " + ", ".join(items[:limit]) + more


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else "an object that is not a tensor or plain container"
        raise CheckpointError(
            f"{path}: refused to unpickle {what}; only tensors, plain containers, argparse.Namespace and numpy "
            "scalars are allowed in a checkpoint (the file may be unsafe, or not a model checkpoint)"
        ) from None
    except Exception as e:  # zip, legacy-format and stream errors all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None


@dataclass
class LoadedFile:
    """What a checkpoint file holds: a state dict with ``module.`` prefixes stripped, and our config if any."""

    state_dict: dict[str, torch.Tensor]
    config: Sam3DConfig | None
    metadata: dict[str, Any]


def read_checkpoint(path: str | os.PathLike) -> LoadedFile:
    """Read and unwrap a checkpoint file without building any model."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty")
    obj = _torch_load(p)
    config = None
    metadata: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{p}: MemorizingSAM checkpoint format version {version}, this library reads version {FORMAT_VERSION}"
            )
        try:
            config = Sam3DConfig.from_dict(obj["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: invalid model config in the file: {e}") from None
        metadata = dict(obj.get("metadata") or {})
    if isinstance(obj, dict) and "model_state_dict" in obj:
        sd = obj["model_state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        kind = type(obj).__name__
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise CheckpointError(f"{p}: holds a {kind}{keys}, neither a state dict nor {{'model_state_dict': ...}}")
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{p}: 'model_state_dict' is empty or not a dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: state dict entries that are not tensors: {_summarise_keys(bad)}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return LoadedFile(sd, config, metadata)


@dataclass
class Architecture:
    """What a state dict looks like: a config derived from its keys and shapes and, if it is one, the name."""

    config: Sam3DConfig
    encoder_only: bool
    known_name: str | None

    def describe(self) -> str:
        e = self.config.encoder
        attn = "global" if not e.window_size else f"window {e.window_size}, global blocks {list(e.global_attn_indexes)}"
        name = self.known_name or "an unnamed 3D SAM variant"
        part = "encoder only" if self.encoder_only else "full model"
        return (
            f"{name} ({part}: {e.depth} blocks of width {e.embed_dim}, {e.num_heads} heads, {attn}, "
            f"{e.attention_free_blocks} attention-free)"
        )


def _same_weights_layout(a: Sam3DConfig, b: Sam3DConfig) -> bool:
    """Configs that give the same keys and shapes; head counts of the decoder cannot be seen in a state dict."""
    return a.encoder == b.encoder and replace(a.mask_decoder, num_heads=b.mask_decoder.num_heads) == b.mask_decoder


def _check_config_fits(cfg: Sam3DConfig, sd: dict[str, torch.Tensor], path) -> None:
    """The sizes a config would build, against the weights, before anything is built: a stored config of depth
    10^6 would otherwise take minutes to build on the meta device before the key check refuses it."""
    keys = list(sd)
    enc_blocks = len(_block_indices(keys, "image_encoder."))
    dec = {int(m.group(1)) for k in keys if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    pw = sd.get("image_encoder.patch_embed.proj.weight")
    problems = []
    if enc_blocks != cfg.encoder.depth:
        problems.append(f"encoder depth {cfg.encoder.depth}, the weights have {enc_blocks} blocks")
    if len(dec) != cfg.mask_decoder.depth:
        problems.append(f"decoder depth {cfg.mask_decoder.depth}, the weights have {len(dec)} layers")
    if pw is not None and pw.shape[0] != cfg.encoder.embed_dim:
        problems.append(f"encoder width {cfg.encoder.embed_dim}, the weights have {pw.shape[0]}")
    if problems:
        raise CheckpointError(f"{path}: the model config does not fit the weights ({'; '.join(problems)})")


def _block_indices(keys: list[str], prefix: str) -> list[int]:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    return sorted(idx)


def detect_architecture(sd: dict[str, torch.Tensor]) -> Architecture:
    """Derive the architecture of a SAM-Med3D-family state dict from its keys and shapes.

    The SAM-Med3D and FastSAM3D block variants have identical keys; like upstream, a model whose first blocks are
    attention-free is taken to be of the FastSAM3D (post-norm) family, any other of the SAM-Med3D (pre-norm) one.
    Our own checkpoints record their config and do not rely on this.
    """
    keys = list(sd)
    if any(k.startswith("image_encoder.") for k in keys):
        pre, encoder_only = "image_encoder.", False
    elif "patch_embed.proj.weight" in sd:
        pre, encoder_only = "", True
    else:
        raise CheckpointError(
            "not a SAM-Med3D-family checkpoint: no 'image_encoder.*' or 'patch_embed.*' keys; it has "
            + _summarise_keys(keys)
        )
    try:
        pw = sd[pre + "patch_embed.proj.weight"]
        if pw.dim() != 5:
            raise CheckpointError(
                f"patch embedding weight has shape {tuple(pw.shape)}: a 2D model (e.g. 2D SAM), not a 3D one"
            )
        embed_dim, in_chans, patch = pw.shape[0], pw.shape[1], pw.shape[2]
        grid = sd[pre + "pos_embed"].shape[1]
        blocks = _block_indices(keys, pre)
        depth = len(blocks)
        attn_blocks = [i for i in blocks if f"{pre}blocks.{i}.attn.qkv.weight" in sd]
        free = [i for i in blocks if i not in attn_blocks]
        if free != list(range(len(free))):
            raise CheckpointError(f"attention-free blocks {free} are not the first blocks")
        rel = {i: sd.get(f"{pre}blocks.{i}.attn.rel_pos_d") for i in attn_blocks}
        use_rel = all(v is not None for v in rel.values()) and bool(rel)
        if use_rel:
            head_dim = next(iter(rel.values())).shape[1]
        else:
            head_dim = 64
        num_heads = embed_dim // head_dim
        global_len = 2 * grid - 1
        window = 0
        global_idx: list[int] = []
        if use_rel:
            lens = {i: v.shape[0] for i, v in rel.items()}
            window_lens = {n for n in lens.values() if n != global_len}
            if len(window_lens) > 1:
                raise CheckpointError(f"inconsistent relative-position table lengths {sorted(set(lens.values()))}")
            if window_lens:
                window = (window_lens.pop() + 1) // 2
                global_idx = [i for i, n in lens.items() if n == global_len]
        mlp_hidden = sd[f"{pre}blocks.{blocks[0]}.mlp.lin1.weight"].shape[0]
        out_chans = sd[pre + "neck.0.weight"].shape[0]
        enc = EncoderConfig(
            img_size=grid * patch,
            patch_size=patch,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_hidden / embed_dim,
            out_chans=out_chans,
            qkv_bias=f"{pre}blocks.{attn_blocks[0]}.attn.qkv.bias" in sd if attn_blocks else True,
            use_rel_pos=use_rel,
            window_size=window,
            global_attn_indexes=tuple(global_idx) if window else (),
            block_variant="post_norm" if free else "pre_norm",
            attention_free_blocks=len(free),
        )
        if encoder_only:
            pe_cfg, md_cfg = (
                PromptEncoderConfig(embed_dim=out_chans, image_embedding_size=grid, input_image_size=grid * patch),
                None,
            )
        else:
            n_point = len({k for k in keys if re.match(r"prompt_encoder\.point_embeddings\.\d+\.weight$", k)})
            pe_cfg = PromptEncoderConfig(
                embed_dim=sd["prompt_encoder.no_mask_embed.weight"].shape[1],
                image_embedding_size=grid,
                input_image_size=grid * patch,
                mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
                num_point_embeddings=n_point,
            )
            dec_layers = {
                int(m.group(1)) for k in keys if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))
            }
            md_cfg = MaskDecoderConfig(
                transformer_dim=sd["mask_decoder.iou_token.weight"].shape[1],
                depth=len(dec_layers),
                mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
                attention_downsample_rate=sd["mask_decoder.iou_token.weight"].shape[1]
                // sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0],
                num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
                iou_head_depth=len(
                    {k for k in keys if re.match(r"mask_decoder\.iou_prediction_head\.layers\.\d+\.weight$", k)}
                ),
                iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
            )
    except KeyError as e:
        raise CheckpointError(f"incomplete SAM-Med3D-family state dict: missing {e.args[0]!r}") from None
    known = None
    for name, make in CONFIGS.items():
        ref = make()
        if ref.encoder == enc and (
            md_cfg is None
            or (replace(ref.mask_decoder, num_heads=md_cfg.num_heads) == md_cfg and ref.prompt_encoder == pe_cfg)
        ):
            known = name
            break
    cfg = Sam3DConfig(
        name=known or "custom",
        encoder=enc,
        prompt_encoder=pe_cfg,
        mask_decoder=md_cfg or MaskDecoderConfig(transformer_dim=out_chans),
    )
    if known:
        cfg = replace(CONFIGS[known](), name=known)
    return Architecture(cfg, encoder_only, known)


def _check_against(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str) -> None:
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in sd and sd[k].shape != model_sd[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing " + _summarise_keys(missing))
    if unexpected:
        problems.append("unexpected " + _summarise_keys(unexpected))
    if shapes:
        more = f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""
        problems.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:5]) + more)
    if problems:
        raise CheckpointError(f"the file does not fit {what}: " + " | ".join(problems))


def load_model(
    path: str | os.PathLike,
    config: str | Sam3DConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    decoder_checkpoint: str | os.PathLike | None = None,
) -> Sam3D:
    """Build a model from a checkpoint file, strictly.

    Args:
        path: checkpoint (upstream, bare state dict, or ours).
        config: expected config (name or object); None means: use the file's own config or detect it. If given
            and the file is something else, the error names both.
        device, dtype: where and in what precision to put the model (default: CPU, float32). Weights stored in
            fp16 are cast.
        decoder_checkpoint: for encoder-only files (FastSAM3D's distilled students), a full-model checkpoint that
            supplies ``prompt_encoder.*`` and ``mask_decoder.*``.
    """
    loaded = read_checkpoint(path)
    sd = loaded.state_dict
    want = None
    if config is not None:
        want = config
        if isinstance(config, str):
            if config not in CONFIGS:
                raise CheckpointError(f"unknown model config {config!r}; known: {', '.join(sorted(CONFIGS))}")
            want = CONFIGS[config]()
    arch = None
    cfg = loaded.config
    if cfg is None:
        try:
            arch = detect_architecture(sd)
        except CheckpointError as e:
            if want is None:
                raise CheckpointError(f"{path}: {e}") from None
            # With an explicit config the strict key/shape check below gives the more useful message.
        if arch is not None and arch.encoder_only:
            if decoder_checkpoint is None:
                raise CheckpointError(
                    f"{path}: holds only an image encoder ({arch.describe()}); pass a full-model checkpoint for "
                    "the prompt encoder and mask decoder (decoder_checkpoint / --decoder-checkpoint)"
                )
            dec = read_checkpoint(decoder_checkpoint).state_dict
            parts = {k: v for k, v in dec.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
            if not parts:
                raise CheckpointError(f"{decoder_checkpoint}: has no prompt_encoder/mask_decoder weights")
            sd = {**{"image_encoder." + k: v for k, v in sd.items()}, **parts}
            arch = detect_architecture(sd)
        cfg = arch.config if arch is not None else None
    if want is not None:
        if cfg is not None and not _same_weights_layout(want, cfg):
            found = arch.describe() if arch else f"{cfg.name} (config stored in the file)"
            raise CheckpointError(f"{path}: expected a {want.name} checkpoint, but the file looks like {found}")
        cfg = want
    _check_config_fits(cfg, sd, path)
    with torch.device("meta"):
        model = Sam3D(cfg)
    _check_against(model.state_dict(), sd, f"{cfg.name}" + (f" [{arch.describe()}]" if arch else ""))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device=device or "cpu")
    return model.eval()


def save_checkpoint(
    model: Sam3D, path: str | os.PathLike, metadata: dict[str, Any] | None = None, half: bool = False
) -> Path:
    """Write our own format atomically (temporary file + rename): config, weights (fp16 if ``half``), metadata.

    ``metadata`` must hold only plain values (str, int, float, bool, None, lists, dicts).
    """
    p = Path(path)
    sd = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    obj = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "metadata": dict(metadata or {}),
        "model_state_dict": sd,
    }
    return atomic_write(p, lambda f: torch.save(obj, f))
