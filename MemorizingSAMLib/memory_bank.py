"""Memory banks: build from labelled volumes, store in one memory-mappable file, load, retrieve.

File layout (little-endian), version 2 (version 1, without "foreground", is still read):

    8 bytes   magic b"MSAMBANK"
    8 bytes   header length H (uint64)
    H bytes   header, UTF-8 JSON: version, model config, model fingerprint, memory layer, array table
              (name, dtype, shape, offset, crc32), entries' metadata, and the header's own CRC32 of the rest
    ...       arrays at 64-byte aligned offsets: "descriptors" (N, D) float16, "keys" and "values"
              (N, heads, tokens, head_dim) float16, "foreground" (N, tokens) float16: the fraction of each
              token's patch inside the entry's structure (mask-aware memory values)

Loading checks magic, version, size, CRCs of the header and of the descriptors, and that the bank was built for
the same model (config and a hash of every weight that produces the memory layer's keys and values). Keys and
values stay memory-mapped: only retrieved entries are read, each checked against its CRC32 (and for NaN / inf) the
first time. Writing goes to a temporary file in the same folder
that is renamed into place, so a crash never leaves a half-written bank under the bank's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .fileio import atomic_write
from .geometry import CropGrid, Geometry, normalize_crop, read_image, resample_to_crop
from .modeling.config import Sam3DConfig
from .modeling.memory_attention import (
    RetrievedMemory,
    descriptor_spec,
    inverse_distance_weights,
    memory_descriptor,
)
from .modeling.sam3d import Sam3D

MAGIC = b"MSAMBANK"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_ALIGN = 64


class MemoryBankError(ValueError):
    """A memory bank that cannot be used, with the reason."""


FINGERPRINT_FULL = "sha256-full"


def _fingerprint_tensors(model: Sam3D, layer: int) -> list[tuple[str, torch.Tensor]]:
    """The weights that determine the keys/values of encoder block ``layer``: patch and position embedding, the
    blocks before it, and its norm1 and qkv."""
    enc = model.image_encoder
    tensors = list(enc.patch_embed.state_dict().items()) + [("pos_embed", enc.pos_embed)]
    for i, blk in enumerate(enc.blocks[: layer + 1]):
        items = (
            blk.state_dict().items()
            if i < layer
            else [*blk.norm1.state_dict().items(), *blk.attn.qkv.state_dict().items()]
        )
        # Memory gates and mask-value vectors do not change keys/values (a block before the memory layer
        # never uses them); leaving them out keeps a bank valid when a model gains them (memory fine-tuning).
        tensors += [
            (f"{i}.{k}", v) for k, v in items if not k.endswith(("memory_gate", "memory_fg", "memory_pos_bias"))
        ]
    return tensors


def model_fingerprint(model: Sam3D, layer: int, kind: str = FINGERPRINT_FULL) -> str:
    """Hash of the weights that make the keys/values of encoder block ``layer`` (see _fingerprint_tensors): every
    weight, as float32 (``kind`` "sha256-full"); banks written before it carry the "sampled" kind (every 4096th
    weight), which is still checked as it was."""
    h = hashlib.sha256()
    for name, t in _fingerprint_tensors(model, layer):
        flat = t.detach().float().reshape(-1).cpu()
        if kind != FINGERPRINT_FULL:
            flat = flat[:: max(1, flat.numel() // 4096)]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat.numpy().astype(np.float32).tobytes())
    return h.hexdigest()[:32]


def row_crcs(a: np.ndarray) -> list[int]:
    """CRC32 of each entry's row (keys, values): checked when the entry is first read, so a damaged row is
    found without reading the whole bank at load."""
    return [zlib.crc32(np.ascontiguousarray(row).tobytes()) for row in a]


@dataclass
class BankEntry:
    """Metadata of one memory entry."""

    label: str
    label_value: int
    source: str
    crop_origin_ras: tuple[float, float, float]
    voxels: int

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "crop_origin_ras": list(self.crop_origin_ras)}


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def write_bank(
    path: str | os.PathLike,
    model: Sam3D,
    layer: int,
    descriptors: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    entries: Sequence[BankEntry],
    extra: dict[str, Any] | None = None,
    foreground: np.ndarray | None = None,
) -> Path:
    """Write a bank file atomically. descriptors (N, D), keys/values (N, heads, tokens, head_dim), foreground
    (N, tokens) or None; stored fp16."""
    n = len(entries)
    arrays = {
        "descriptors": np.ascontiguousarray(descriptors, dtype=np.float16),
        "keys": np.ascontiguousarray(keys, dtype=np.float16),
        "values": np.ascontiguousarray(values, dtype=np.float16),
    }
    if foreground is not None:
        arrays["foreground"] = np.ascontiguousarray(foreground, dtype=np.float16)
    for name, a in arrays.items():
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} rows for {n} entries")
    table, offset = [], 0
    for name, a in arrays.items():
        table.append(
            {
                "name": name,
                "dtype": "float16",
                "shape": list(a.shape),
                "offset": offset,
                "crc32": zlib.crc32(a.tobytes()) if name in ("descriptors", "foreground") else None,
                "row_crc32": row_crcs(a) if name in ("keys", "values") else None,
            }
        )
        offset = _aligned(offset + a.nbytes)
    header = {
        "version": VERSION,
        "model_config": model.cfg.to_dict(),
        "model_fingerprint": model_fingerprint(model, layer),
        "fingerprint_kind": FINGERPRINT_FULL,
        "layer": int(layer),
        "descriptor": descriptor_spec(model.cfg.encoder.memory_descriptor),
        "arrays": table,
        "data_bytes": offset,
        "entries": [e.to_json() for e in entries],
        "extra": extra or {},
    }
    body = json.dumps(header, sort_keys=True).encode()
    header_bytes = json.dumps({"crc32": zlib.crc32(body), "header": header}, sort_keys=True).encode()
    start = _aligned(16 + len(header_bytes))

    def write(f) -> None:
        f.write(MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes)
        f.write(b"\0" * (start - 16 - len(header_bytes)))
        for spec, a in zip(table, arrays.values()):
            f.seek(start + spec["offset"])
            f.write(a.tobytes())
        f.truncate(start + offset)

    return atomic_write(path, write)


@dataclass
class MemoryBank:
    """A loaded bank: descriptors in memory (float32 for exact top-k), keys/values memory-mapped."""

    path: Path
    layer: int
    model_config: dict[str, Any]
    fingerprint: str
    descriptors: torch.Tensor
    keys: np.ndarray
    values: np.ndarray
    entries: list[dict[str, Any]]
    k: int = 3
    local_ratio: float = 0.3
    foreground: np.ndarray | None = None
    descriptor_kind: str = "token_mean_std_random_projection"
    fingerprint_kind: str = "sampled"
    row_crc32: dict[str, list[int]] | None = None  # per-entry CRCs of keys and values (banks of this version)
    _desc_sq: torch.Tensor | None = field(default=None, repr=False)
    _verified: set[int] = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Sam3D | None = None, k: int = 3, local_ratio: float = 0.3
    ) -> MemoryBank:
        """Open a bank; with ``model``, refuse a bank built for another model (config or weights)."""
        p = Path(path)
        if not p.is_file():
            raise MemoryBankError(f"{p}: no such memory bank")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise MemoryBankError(f"{p}: not a MemorizingSAM memory bank (bad magic)")
            (hlen,) = struct.unpack("<Q", head[8:])
            if hlen > size:
                raise MemoryBankError(f"{p}: truncated (header of {hlen} bytes in a {size}-byte file)")
            raw = f.read(hlen)
        try:
            outer = json.loads(raw)
            header = outer["header"]
            if zlib.crc32(json.dumps(header, sort_keys=True).encode()) != outer["crc32"]:
                raise MemoryBankError(f"{p}: corrupt header (checksum mismatch)")
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, MemoryBankError):
                raise
            raise MemoryBankError(f"{p}: corrupt header ({type(e).__name__})") from None
        if header.get("version") not in READABLE_VERSIONS:
            raise MemoryBankError(
                f"{p}: bank format version {header.get('version')}, this library reads versions {READABLE_VERSIONS}"
            )
        desc = header.get("descriptor")
        try:
            known = isinstance(desc, dict) and descriptor_spec(desc.get("kind")) == desc
        except ValueError:
            known = False
        if not known:
            raise MemoryBankError(f"{p}: descriptors of kind {desc}, which this library does not compute")
        start = _aligned(16 + hlen)
        if size < start + header["data_bytes"]:
            raise MemoryBankError(f"{p}: truncated ({size} bytes, {start + header['data_bytes']} expected)")
        arrays = {}
        for spec in header["arrays"]:
            arrays[spec["name"]] = np.memmap(
                p, dtype=np.float16, mode="r", offset=start + spec["offset"], shape=tuple(spec["shape"])
            )
            if (
                spec.get("crc32") is not None
                and zlib.crc32(np.asarray(arrays[spec["name"]]).tobytes()) != spec["crc32"]
            ):
                raise MemoryBankError(f"{p}: corrupt data in '{spec['name']}' (checksum mismatch)")
        bank = cls(
            p,
            int(header["layer"]),
            header["model_config"],
            header["model_fingerprint"],
            torch.from_numpy(np.asarray(arrays["descriptors"], dtype=np.float32)),
            arrays["keys"],
            arrays["values"],
            header["entries"],
            k,
            local_ratio,
            arrays.get("foreground"),
            desc["kind"],
            header.get("fingerprint_kind", "sampled"),
            {
                spec["name"]: spec["row_crc32"]
                for spec in header["arrays"]
                if spec.get("row_crc32") is not None and len(spec["row_crc32"]) == spec["shape"][0]
            }
            or None,
        )
        if not bank.descriptors.isfinite().all():
            raise MemoryBankError(f"{p}: NaN or infinite descriptors")
        if model is not None:
            bank.check_model(model)
        return bank

    def check_model(self, model: Sam3D) -> None:
        try:
            built_for = Sam3DConfig.from_dict(self.model_config)
        except (TypeError, ValueError) as e:
            raise MemoryBankError(f"{self.path}: unreadable model config in the bank ({e})") from None
        if built_for.encoder != model.cfg.encoder:
            raise MemoryBankError(f"{self.path}: built for a {built_for.name} encoder, not this {model.cfg.name} model")
        if self.descriptor_kind != model.cfg.encoder.memory_descriptor:
            raise MemoryBankError(
                f"{self.path}: descriptors of kind {self.descriptor_kind}, {model.cfg.name} retrieves with "
                f"{model.cfg.encoder.memory_descriptor}"
            )
        if model_fingerprint(model, self.layer, self.fingerprint_kind) != self.fingerprint:
            raise MemoryBankError(f"{self.path}: built with other weights than this model's ({model.cfg.name})")
        enc = model.cfg.encoder
        if (enc.memory_mask_values or enc.memory_prior_embedding) and self.foreground is None:
            raise MemoryBankError(
                f"{self.path}: {model.cfg.name} needs the structures' masks in the bank (format 2); rebuild it with "
                "memsam build-memory"
            )

    # ---------------------------------------------------------------------------------------- retrieval
    def nearest(self, query: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by Euclidean distance: (indices (k,), distances (k,)), nearest first."""
        k = min(k or self.k, len(self))
        if k == 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        if self._desc_sq is None:
            self._desc_sq = (self.descriptors * self.descriptors).sum(1)
        q = query.reshape(-1).float().cpu()
        d2 = self._desc_sq - 2 * (self.descriptors @ q) + (q * q).sum()
        vals, idx = torch.topk(d2, k, largest=False)
        return idx, vals.clamp_min(0).sqrt()

    def retrieve_entries(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values (k, heads, tokens, head_dim) and foreground fractions (k, tokens) or None of entries
        ``idx`` as float16 tensors, in ``idx`` order. Reads only those entries from the memory-mapped file."""
        ids = idx.numpy()
        keys = np.stack([self.keys[i] for i in ids])
        values = np.stack([self.values[i] for i in ids])
        for i, kv in zip(ids, zip(keys, values)):
            if int(i) not in self._verified:
                self._verify_entry(int(i), *kv)
        keys, values = torch.from_numpy(keys), torch.from_numpy(values)
        fg = None if self.foreground is None else torch.from_numpy(np.stack([self.foreground[i] for i in ids]))
        return keys, values, fg

    def _verify_entry(self, i: int, keys: np.ndarray, values: np.ndarray) -> None:
        """An entry's keys and values against their CRCs and for NaN / inf, the first time it is read."""
        if self.row_crc32 is not None:
            for name, rows in (("keys", keys), ("values", values)):
                if zlib.crc32(np.ascontiguousarray(rows).tobytes()) != self.row_crc32[name][i]:
                    raise MemoryBankError(f"{self.path}: corrupt {name} of entry {i} (checksum mismatch)")
        if not (np.isfinite(keys).all() and np.isfinite(values).all()):
            raise MemoryBankError(f"{self.path}: NaN or infinite keys or values in entry {i}")
        self._verified.add(i)

    def provider(self, device: torch.device | str | None = None) -> BankProvider:
        return BankProvider(self, device)


class BankProvider:
    """MemoryProvider for the encoder: retrieves once per encoder pass (once per embedding, never per click)."""

    def __init__(self, bank: MemoryBank, device=None) -> None:
        self.bank = bank
        self.layer = bank.layer
        self.device = device
        self.last: dict[str, Any] = {}

    def retrieve(self, tokens: torch.Tensor) -> RetrievedMemory | None:
        if len(self.bank) == 0 or self.bank.k == 0:
            return None
        desc = memory_descriptor(tokens, self.bank.descriptor_kind)[0]
        idx, dist = self.bank.nearest(desc)
        keys, values, fg = self.bank.retrieve_entries(idx)
        dev = tokens.device if self.device is None else self.device
        self.last = {
            "indices": idx.tolist(),
            "distances": dist.tolist(),
            "labels": [self.bank.entries[i]["label"] for i in idx.tolist()],
        }
        return RetrievedMemory(
            keys.to(dev),
            values.to(dev),
            inverse_distance_weights(dist).to(dev),
            self.bank.local_ratio,
            None if fg is None else fg.to(dev),
        )


# ------------------------------------------------------------------------------------------------ building
def interior_point(mask: np.ndarray) -> np.ndarray:
    """(i, j, k) of the voxel of ``mask`` ([k, j, i]) farthest from its border; ties: the first in C order."""
    dt = ndimage.distance_transform_edt(np.pad(mask > 0, 1))[1:-1, 1:-1, 1:-1]
    k, j, i = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return np.array([i, j, k], dtype=np.float64)


def token_foreground(mask_crop: np.ndarray, patch: int) -> np.ndarray:
    """Fraction of each token's patch inside the structure: (S, S, S) crop mask in [0, 1], indexed [x, y, z]
    -> (G^3,) float32 in the encoder's token order (x slowest, z fastest)."""
    g = mask_crop.shape[0] // patch
    m = mask_crop.reshape(g, patch, g, patch, g, patch).astype(np.float32)
    return m.mean(axis=(1, 3, 5)).reshape(-1)


@torch.inference_mode()
def structure_entry(
    model: Sam3D, image: sitk.Image, structure: sitk.Image, ijk: np.ndarray, layer: int, mirror: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, CropGrid]:
    """One memory entry: the crop centred at voxel ``ijk`` of ``image`` (float image) as a first click would
    place it, and ``structure`` (float32 mask in {0, 1} on the image's grid); ``mirror`` flips the crop left-right
    (a stand-in for the contralateral twin). Returns descriptor (D,), keys and values (heads, tokens, head_dim),
    token foreground fractions (tokens,), all float32, and the crop grid."""
    p = next(model.parameters())
    geom = Geometry.from_sitk(image)
    grid = CropGrid.centred_on(geom.ijk_to_ras(ijk), model.cfg.spacing_mm, model.cfg.encoder.img_size)
    arr = normalize_crop(resample_to_crop(image, grid, model.cfg.pad_value), model.cfg.normalization)
    mask = resample_to_crop(structure, grid, 0.0)
    if mirror:
        arr, mask = arr[::-1], mask[::-1]
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(p.device, p.dtype)[None, None]
    k, v, d = model.image_encoder.memory_entry(x, layer)
    fg = token_foreground(np.ascontiguousarray(mask), model.cfg.encoder.patch_size)
    return (
        d[0].float().cpu().numpy(),
        k[0].float().cpu().numpy(),
        v[0].float().cpu().numpy(),
        fg,
        grid,
    )


def case_entries(
    model: Sam3D,
    case: tuple,
    label_names: dict[int, str] | None = None,
    layer: int | None = None,
    min_voxels: int = 20,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BankEntry]]:
    """The bank entries of one (case name, image, label map[, label values to use]) tuple, in label order:
    (descriptor, keys, values, token foreground, entry) per structure of at least ``min_voxels`` voxels."""
    layer = model.cfg.memory_layer if layer is None else layer
    name, image, label, *allowed = case
    img = image if isinstance(image, sitk.Image) else read_image(image)
    img = sitk.Cast(img, sitk.sitkFloat32)
    lab_img = label if isinstance(label, sitk.Image) else read_image(label)
    lab = sitk.GetArrayViewFromImage(lab_img)
    label_values = sorted(int(v) for v in np.unique(lab) if v != 0)
    if allowed and allowed[0] is not None:
        label_values = [v for v in label_values if v in set(allowed[0])]
    out = []
    for value in label_values:
        m = lab == value
        if m.sum() < min_voxels:
            continue
        structure = sitk.GetImageFromArray(m.astype(np.float32))
        structure.CopyInformation(lab_img)
        d, k, v, fg, grid = structure_entry(model, img, structure, interior_point(m), layer)
        entry = BankEntry(
            (label_names or {}).get(value, str(value)),
            value,
            name,
            tuple(float(c) for c in grid.origin_ras),
            int(m.sum()),
        )
        out.append((d, k, v, fg, entry))
    return out


def build_bank(
    model: Sam3D,
    cases: Iterable[tuple],
    label_names: dict[int, str] | None = None,
    out: str | os.PathLike = "bank.msam",
    layer: int | None = None,
    min_voxels: int = 20,
    progress: Callable[[int, int, str], None] | None = None,
    ranks=None,
) -> Path | None:
    """Build a bank from (case name, image, label map[, label values to use]) tuples: one entry per structure
    (label value) per case, its crop centred at the structure's interior-most voxel, exactly as a first click
    would place it; the structure's mask is stored per token for mask-aware memory values.

    ``ranks`` (distributed.Ranks, under torchrun): each rank encodes its share of the cases, rank 0 gathers them
    in the given order and writes the same bank as one process would; the other ranks return None."""
    from .distributed import Ranks, gather_to_main

    ranks = ranks or Ranks()
    layer = model.cfg.memory_layer if layer is None else layer
    if layer < 0:
        raise ValueError(f"model {model.cfg.name} has no memory layer configured; pass layer=")
    cases = list(cases)
    mine = ranks.shard(len(cases))
    done = []
    for n, ci in enumerate(mine):
        done.append((ci, case_entries(model, cases[ci], label_names, layer, min_voxels)))
        if progress and ranks.main:
            progress(n + 1, len(mine), cases[ci][0])
    gathered = gather_to_main(done, ranks)
    if not ranks.main:
        return None
    pieces = sorted((p for part in gathered for p in part), key=lambda p: p[0])
    rows = [r for _, per_case in pieces for r in per_case]
    if not rows:
        raise ValueError("no labelled structure found in the given cases")
    descs, keys, values, fgs, entries = (list(col) for col in zip(*rows))
    return write_bank(
        out, model, layer, np.stack(descs), np.stack(keys), np.stack(values), entries, foreground=np.stack(fgs)
    )
