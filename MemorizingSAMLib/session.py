"""InteractiveSession: a volume in, clicks and boxes per segment, a uint8 mask per segment in the volume's grid.

What every front end calls (Slicer module, server, CLI, evaluation). One encoder pass per crop (cached), one prompt
encoder + mask decoder pass per click, and only the changed region of the full-resolution mask is rewritten; every
call returns that region so that a caller copies only it.

Coordinates: prompts are continuous voxel indices (i, j, k) of the volume (SimpleITK order; numpy arrays of the
volume and of the masks are indexed [k, j, i]). See geometry.py for the conventions.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch

from .capabilities import bf16_note
from .edge_refine import DEFAULT_EDGE_REFINE, EdgeRefineConfig, grown_region, refine
from .embedding_cache import EmbeddingCache
from .fileio import write_image
from .geometry import (
    CropGrid,
    Geometry,
    ImageError,
    image_from_array,
    normalize_crop,
    read_image,
    resample_to_crop,
    validate_image,
)
from .islands import drop_islands
from .modeling.prepared import PreparedEmbedding
from .modeling.sam3d import Sam3D
from .paste import PasteScratch, Tile, positive_region, sample_logits, sample_tiles
from .prompts import Prompt, PromptError, Region

OVERLAP_POLICIES = ("allow", "protect")
BOX_STRATEGIES = ("center_click", "center_click_mask_prompt")
PRODUCT_DTYPES = (None, "bfloat16")


@dataclass
class PromptState:
    """What the model sees for one segment: its crop, the prompts inside it, the previous low-res logits and the
    volume region the last result occupied in this crop (to be cleared by the next one)."""

    crop: CropGrid | None = None
    prompts: tuple[Prompt, ...] = ()
    low_res: torch.Tensor | None = None
    last_region: Region | None = None
    locked: bool = False  # crop fixed by lock_crop (the published evaluation protocol)
    # The caller's prompts in the order they were placed (``prompts`` is what the model sees: only those in the
    # crop, one box), and ``chain[n]``, the model state after ``placed[: n + 1]``: a change at prompt n replays
    # from chain[n - 1], so appending or moving the newest prompt costs one decode.
    placed: tuple[Prompt, ...] = ()
    chain: tuple[PromptState | None, ...] = ()  # None: dropped (SessionOptions.max_chain_states)

    def base(self) -> PromptState:
        """The state before the first prompt (a locked crop stays)."""
        return PromptState(crop=self.crop, locked=True) if self.locked else PromptState()


@dataclass
class MaskEdit:
    """A box of a segment's mask rewritten by a step: its bits before and after (np.packbits of the [k, j, i] C
    order of ``region``; masks hold 0/1 only, so unpacking restores either side byte for byte at 1/8 byte per
    voxel), and ``changed``, the box of the voxels that actually differ (what callers copy)."""

    segment: int
    region: Region
    changed: Region
    before: np.ndarray
    after: np.ndarray

    # Changes spread over more packed bytes than this are reported as the whole box: locating them exactly would
    # cost more than copying the box (a refinement click typically changes a few hundred bytes of a tile).
    EXACT_BOX_MAX_BYTES = 4096

    @classmethod
    def between(cls, segment: int, region: Region, before: np.ndarray, after: np.ndarray) -> MaskEdit | None:
        """The edit from ``before`` to ``after`` (0/1 [k, j, i] arrays covering ``region``); None if equal."""
        bits_before, bits_after = np.packbits(before), np.packbits(after)
        flipped = bits_before ^ bits_after
        n = np.count_nonzero(flipped)
        if n == 0:
            return None
        changed = region
        if n <= cls.EXACT_BOX_MAX_BYTES:
            # The box of the changed bytes: each covers 8 consecutive voxels of a row, or straddles two rows.
            first = 8 * np.flatnonzero(flipped)
            last = np.minimum(first + 7, before.size - 1)
            (kf, jf, i_f), (kl, jl, il) = (np.unravel_index(v, before.shape) for v in (first, last))
            straddles = kf * before.shape[1] + jf != kl * before.shape[1] + jl
            i0 = 0 if straddles.any() else int(i_f.min())
            i1 = before.shape[2] if straddles.any() else int(il.max()) + 1
            lo = (region.lo[0] + i0, region.lo[1] + int(min(jf.min(), jl.min())), region.lo[2] + int(kf.min()))
            hi = (region.lo[0] + i1, region.lo[1] + int(max(jf.max(), jl.max())) + 1, region.lo[2] + int(kl.max()) + 1)
            changed = Region(lo, hi)
        return cls(segment, region, changed, bits_before, bits_after)

    def undo(self, mask: np.ndarray) -> None:
        self._write(mask, self.before)

    def redo(self, mask: np.ndarray) -> None:
        self._write(mask, self.after)

    def _write(self, mask: np.ndarray, bits: np.ndarray) -> None:
        view = mask[self.region.slices]
        view[...] = np.unpackbits(bits, count=view.size).reshape(view.shape)


@dataclass
class Step:
    segment: int
    before: PromptState
    after: PromptState
    edits: list[MaskEdit]
    nbytes: int = field(init=False)  # what the step holds: packed mask bits, its result's low-res logits, prompts

    def __post_init__(self) -> None:
        low = self.after.low_res
        # The prompt tuples are new objects per step (8 bytes a reference, plus the Prompt itself when new):
        # counted, so that 10,000 clicks stay within the cap instead of growing quadratically outside it.
        a = self.after
        self.nbytes = (
            sum(e.before.nbytes + e.after.nbytes for e in self.edits)
            + (low.numel() * low.element_size() if low is not None else 0)
            + 8 * (len(a.placed) + len(a.chain) + len(a.prompts))
        )


@dataclass
class Segment:
    id: int
    name: str
    mask: np.ndarray  # uint8 [k, j, i], the volume's grid
    state: PromptState = field(default_factory=PromptState)
    undo: list[Step] = field(default_factory=list)
    redo: list[Step] = field(default_factory=list)
    undo_bytes: int = 0  # sum of the undo steps' nbytes

    def push(self, step: Step, max_bytes: int) -> None:
        """A new step: it clears the redo list; the oldest steps go while the history holds more than
        ``max_bytes`` (the newest one always stays)."""
        self.undo.append(step)
        self.undo_bytes += step.nbytes
        self.redo.clear()
        drop = 0
        while self.undo_bytes > max_bytes and drop < len(self.undo) - 1:
            self.undo_bytes -= self.undo[drop].nbytes
            drop += 1
        del self.undo[:drop]

    def step_back(self) -> Step | None:
        """Move the newest undo step to the redo list and return it (None if there is none)."""
        if not self.undo:
            return None
        step = self.undo.pop()
        self.undo_bytes -= step.nbytes
        self.redo.append(step)
        return step

    def step_forward(self) -> Step | None:
        """Move the newest redo step back to the undo list and return it (None if there is none)."""
        if not self.redo:
            return None
        step = self.redo.pop()
        self.undo.append(step)
        self.undo_bytes += step.nbytes
        return step


@dataclass
class DecoderInputs:
    """One decode's prompt tensors in crop space (see InteractiveSession._decoder_inputs)."""

    points: torch.Tensor | None  # (1, N, 3) crop voxel coordinates (x, y, z)
    labels: torch.Tensor | None  # (1, N) 1 include / 0 exclude
    boxes: torch.Tensor | None  # (1, 2, 3) corners, models with box embeddings only
    mask: torch.Tensor  # (1, 1, L, L, L) mask prompt (previous low-res logits)


@dataclass(frozen=True)
class SessionOptions:
    """Behaviour switches of a session.

    newest_click_only: the published evaluation protocol (only the newest click + previous logits) instead of all
        prompts in the crop.
    overlap: "allow" (segments are independent masks) or "protect" (a segment never takes voxels of another).
    box_strategy: how a box becomes prompts for models without box embeddings (see add_box).
    clamp_to_box: voxels outside a segment's box are never set.
    recrop_margin: a prompt closer than this many model voxels to the crop's faces moves the crop.
    max_chain_states: the model state after each of this many newest prompts is kept, so that moving or deleting
        one of them replays only from there (a change further back replays from the newest state kept before it).
    max_points: at most this many of the newest clicks in the crop go to the model; older ones act through the
        previous logits (the mask prompt). SAM-Med3D trains with 1-10 accumulated clicks, so 10 keeps the input in
        the training distribution and the decoder's cost bounded.
    edge_refine: a guided filter that moves the upsampled mask's boundary onto the image's edges at the volume's
        resolution (edge_refine.py; on by default, ~3 ms per click on the lung CT); None: the mask is exactly the
        model's logits upsampled, as the published models' code gives it (the legacy evaluation protocol).
    drop_islands: with edge_refine on, a 26-connected part of the new mask that holds no include click (nor a
        box's centre) and has fewer than this share of the largest part's voxels is dropped (islands.py: specks
        on strong edges elsewhere in the crop); None keeps every part.
    product_dtype: None (exact: the model's dtype) or "bfloat16": the mask decoder's large products with the image
        tokens in bfloat16 (see Sam3D.decode), ~1 ms less per click on CPUs with native bf16 dot products; masks
        differ from the exact ones at a few boundary voxels (README, "The interactive session").
    """

    newest_click_only: bool = False
    overlap: str = "allow"
    box_strategy: str = "center_click_mask_prompt"
    box_logit: float = 4.0
    clamp_to_box: bool = True
    recrop_margin: float = 0.0
    max_points: int = 10
    product_dtype: str | None = None
    max_undo_bytes: int = 256 * 2**20
    max_chain_states: int = 64
    edge_refine: EdgeRefineConfig | None = DEFAULT_EDGE_REFINE
    drop_islands: float | None = 0.05

    def __post_init__(self) -> None:
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if self.max_chain_states < 1:
            raise ValueError(f"max_chain_states must be >= 1, got {self.max_chain_states}")
        if self.drop_islands is not None and not 0.0 <= self.drop_islands <= 1.0:
            raise ValueError(f"drop_islands must be None or in [0, 1], got {self.drop_islands}")
        if self.max_undo_bytes < 0:
            raise ValueError(f"max_undo_bytes must be >= 0, got {self.max_undo_bytes}")
        if self.product_dtype not in PRODUCT_DTYPES:
            raise ValueError(f"product_dtype must be one of {PRODUCT_DTYPES}, got {self.product_dtype!r}")
        if self.overlap not in OVERLAP_POLICIES:
            raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {self.overlap!r}")
        if self.box_strategy not in BOX_STRATEGIES:
            raise ValueError(f"box_strategy must be one of {BOX_STRATEGIES}, got {self.box_strategy!r}")


class InteractiveSession:
    """Interactive segmentation of one volume with one model.

    >>> s = InteractiveSession(model)
    >>> s.set_image("ct.nii.gz")
    >>> seg = s.add_segment("tumour")
    >>> region = s.add_point((210.0, 180.0, 30.0))      # (i, j, k) voxel index, include click
    >>> s.mask(seg)[region.slices]                       # the changed part of the uint8 [k, j, i] mask
    """

    def __init__(
        self,
        model: Sam3D,
        options: SessionOptions | None = None,
        cache: EmbeddingCache | None = None,
        memory=None,
    ) -> None:
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.options = options or SessionOptions()
        if self.options.product_dtype == "bfloat16":
            note = bf16_note(self.device)
            if note:
                warnings.warn(f"product_dtype='bfloat16': {note}", RuntimeWarning, stacklevel=2)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cfg = model.cfg
        # A MemoryBank (memory_bank.py), checked against the model; retrieval runs once per embedding.
        self.memory = memory
        self._provider = None
        if memory is not None:
            memory.check_model(model)
            self._provider = memory.provider(self.device)
        self.image: sitk.Image | None = None
        self._voxels: np.ndarray | None = None
        self.geometry: Geometry | None = None
        self._image_key: object | None = None
        self.segments: dict[int, Segment] = {}
        self.active: int | None = None
        self._ids = itertools.count(1)
        self.last_timing: dict[str, float] = {}
        self._scratch = PasteScratch()

    # ----------------------------------------------------------------------------------------------- image
    def set_image(
        self,
        image: str | os.PathLike | sitk.Image | np.ndarray,
        spacing: tuple[float, float, float] | None = None,
        origin: tuple[float, float, float] | None = None,
        direction: tuple[float, ...] | np.ndarray | None = None,
    ) -> Geometry:
        """Load the volume to segment: a path (file or DICOM folder), a SimpleITK image, or a [k, j, i] array with
        ``spacing`` (mm along i, j, k), LPS ``origin`` and ``direction``. Validates before touching the session:
        a refused image leaves the previous one and its segments in place. A new image drops all segments."""
        if isinstance(image, np.ndarray):
            img = image_from_array(
                image,
                spacing if spacing is not None else (1.0, 1.0, 1.0),
                origin if origin is not None else (0.0, 0.0, 0.0),
                direction if direction is not None else np.eye(3),
            )
        elif isinstance(image, sitk.Image):
            img = image
        else:
            img = read_image(image)
        validate_image(img)
        self.image = img
        self.geometry = Geometry.from_sitk(img)
        # The voxels as a [k, j, i] view of the image's buffer (no copy), for the edge refinement; taken whatever
        # the options say, so that options changed later find it.
        self._voxels = sitk.GetArrayViewFromImage(img)
        self._image_key = object()  # identity of this image for the embedding cache
        self.segments.clear()
        self.active = None
        self._ids = itertools.count(1)
        return self.geometry

    def _require_image(self) -> Geometry:
        if self.geometry is None:
            raise ImageError("no image: call set_image first")
        return self.geometry

    # -------------------------------------------------------------------------------------------- segments
    def add_segment(self, name: str | None = None) -> int:
        """A new empty segment, made active; returns its id."""
        geom = self._require_image()
        sid = next(self._ids)
        # np.zeros maps untouched pages lazily, so a large volume costs memory only where masks are written.
        mask = np.zeros(geom.size[::-1], dtype=np.uint8)
        self.segments[sid] = Segment(sid, name or f"Segment_{sid}", mask)
        self.active = sid
        return sid

    def select_segment(self, segment: int) -> None:
        self._segment(segment)
        self.active = segment

    def _segment(self, segment: int | None) -> Segment:
        self._require_image()
        sid = self.active if segment is None else segment
        if sid is None:
            sid = self.add_segment()
        if sid not in self.segments:
            raise PromptError(f"no segment {sid}; segments are {sorted(self.segments)}")
        return self.segments[sid]

    def remove_segment(self, segment: int) -> None:
        """Forget a segment, its mask and its history."""
        self._segment(segment)
        del self.segments[segment]
        if self.active == segment:
            self.active = None

    def lock_crop(self, centre_ijk, segment: int | None = None) -> None:
        """Fix a segment's crop centred at ``centre_ijk`` (published protocol: centred on the ground truth);
        prompts outside it no longer move it. Only before the segment's first prompt."""
        seg = self._segment(segment)
        if seg.state.placed:
            raise PromptError("lock_crop must come before the segment's first prompt")
        c = np.asarray(centre_ijk, dtype=np.float64)
        crop = CropGrid.centred_on(self.geometry.ijk_to_ras(c), self.cfg.spacing_mm, self.cfg.encoder.img_size)
        seg.state = PromptState(crop=crop, locked=True)

    def mask(self, segment: int | None = None) -> np.ndarray:
        """The uint8 [k, j, i] mask of a segment (a live array: copy it if you keep it)."""
        return self._segment(segment).mask

    def prompts(self, segment: int | None = None) -> tuple[Prompt, ...]:
        """The prompts the model saw at the segment's last step (those in its crop, at most one box)."""
        return self._segment(segment).state.prompts

    def placed(self, segment: int | None = None) -> tuple[Prompt, ...]:
        """The segment's prompts as the caller placed them, in order, tags included (follows undo and redo)."""
        return self._segment(segment).state.placed

    # ----------------------------------------------------------------------------------------------- prompts
    def add_point(self, ijk, include: bool = True, segment: int | None = None) -> Region | None:
        """Add an include (or exclude) click at continuous voxel index ``ijk`` = (i, j, k) and update the mask.

        Returns the region of the mask that changed (None if nothing did)."""
        seg = self._segment(segment)
        p = self._checked_point(ijk)
        return self._apply(seg, seg.state.placed + (Prompt(tuple(p), bool(include)),))

    def add_box(self, ijk_min, ijk_max, segment: int | None = None) -> Region | None:
        """Add a box given by two opposite corners (voxel indices, inclusive, any order) and update the mask.

        Models with box embeddings get the box itself. The published ones have none; for them the box becomes a
        crop centred on the box, an include click at its centre and, with ``box_strategy`` 'center_click_mask_prompt'
        (default), a box-shaped low-res mask prompt on the first step; ``clamp_to_box`` keeps the result inside the
        box. A segment has at most one box: a new box replaces the previous one."""
        seg = self._segment(segment)
        a, b = self._checked_point(ijk_min), self._checked_point(ijk_max)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        if np.any(hi - lo < 1e-6):
            raise PromptError(f"the box {_ijk_text(lo)}-{_ijk_text(hi)} has zero size along an axis")
        return self._apply(seg, seg.state.placed + (Prompt(tuple(lo), True, tuple(hi)),))

    def set_prompts(self, prompts: list[Prompt], segment: int | None = None) -> Region | None:
        """Make ``prompts`` (in placement order) the segment's prompts: points added, moved or deleted in a viewer.

        Only what changed is recomputed: the model steps are replayed from the first prompt that differs from the
        current ones (by value and tag), from the state kept after the one before it, so adding or moving the
        newest prompt costs one decode. One undo step; None (and no step) if nothing changed, an empty list clears
        the segment like :meth:`reset`. The mask is the one the same prompts clicked one by one give, except where
        a replayed prompt moved the crop: then only the last crop's result is written."""
        seg = self._segment(segment)
        prompts = tuple(prompts)
        for p in prompts:
            self._checked_point(p.ijk)
            if p.box_hi is not None:
                self._checked_point(p.box_hi)
                if np.any(np.asarray(p.box_hi) - np.asarray(p.ijk) < 1e-6):
                    box = f"{_ijk_text(p.ijk)}-{_ijk_text(p.box_hi)}"
                    raise PromptError(f"the box {box} needs its low corner first and a non-zero size")
        if not prompts:
            return self.reset(seg.id) if seg.state.placed else None
        if prompts == seg.state.placed:
            return None
        return self._apply(seg, prompts)

    def _checked_point(self, ijk) -> np.ndarray:
        geom = self._require_image()
        p = np.asarray(ijk, dtype=np.float64).reshape(-1)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise PromptError(f"a point needs three finite voxel indices (i, j, k), got {ijk!r}")
        if not geom.contains_ijk(p):
            raise PromptError(f"point (i, j, k) = {_ijk_text(p)} lies outside the image of size {geom.size}")
        return p

    # ----------------------------------------------------------------------------------------- computation
    def _embedding(self, crop: CropGrid) -> PreparedEmbedding:
        mem_key = None if self.memory is None else (id(self.memory), self.memory.k, self.memory.local_ratio)
        key = (self._image_key, crop, mem_key)
        emb = self.cache.get(key)
        if emb is None:
            arr = resample_to_crop(self.image, crop, self.cfg.pad_value)
            arr = normalize_crop(arr, self.cfg.normalization)
            x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, self.dtype)[None, None]
            with torch.inference_mode():
                # Prepared once per crop: every click then decodes with the image-side work done (prepared.py).
                emb = self.model.prepare_embedding(self.model.encode(x, memory=self._provider))
            self.cache.put(key, emb)
        return emb

    def _new_crop_for(self, prompt: Prompt) -> CropGrid:
        ras = self.geometry.ijk_to_ras(prompt.centre)
        return CropGrid.centred_on(ras, self.cfg.spacing_mm, self.cfg.encoder.img_size)

    def _in_crop(self, crop: CropGrid, prompt: Prompt) -> bool:
        pts = [prompt.ijk] if prompt.box_hi is None else [prompt.ijk, prompt.box_hi]
        m = self.options.recrop_margin
        return all(crop.contains(crop.ras_to_crop(self.geometry.ijk_to_ras(p)), margin=m) for p in pts)

    def _predict(self, state: PromptState, newest: Prompt, low_override) -> tuple[PromptState, torch.Tensor]:
        """One model step for ``state.prompts`` (``newest`` last): place the crop, pick the prompts the decoder
        sees, build its inputs, decode."""
        crop, prompts, low_prev = self._place_crop(state, newest)
        emb = self._embedding(crop)
        inputs = self._decoder_inputs(
            crop, prompts, self._select_prompts(prompts), state.locked, low_prev, low_override
        )
        with torch.inference_mode():
            up = None if self.options.product_dtype is None else getattr(torch, self.options.product_dtype)
            low, _ = self.model.decode(
                emb, inputs.points, inputs.labels, inputs.mask, boxes=inputs.boxes, iou=False, product_dtype=up
            )
        return PromptState(crop=crop, prompts=prompts, low_res=low, locked=state.locked), low

    def _place_crop(self, state: PromptState, newest: Prompt):
        """The crop for ``state.prompts`` after ``newest``: kept while ``newest`` lies inside it (or it is locked),
        else centred on ``newest`` with the previous logits shifted into it and the prompts outside it dropped.
        A new box replaces the segment's earlier box. Returns (crop, prompts, previous low-res logits or None)."""
        crop, low_prev, prompts = state.crop, state.low_res, state.prompts
        if newest.is_box:
            prompts = tuple(p for p in prompts[:-1] if not p.is_box) + (newest,)
        if not state.locked and (crop is None or not self._in_crop(crop, newest) or newest.is_box):
            new_crop = self._new_crop_for(newest)
            if crop is not None and low_prev is not None:
                low_prev = self._shift_logits(low_prev, crop, new_crop)
            crop = new_crop
            prompts = tuple(p for p in prompts if self._in_crop(crop, p))
        return crop, prompts, low_prev

    def _select_prompts(self, prompts: tuple[Prompt, ...]) -> list[Prompt]:
        """What the decoder sees: the box and the newest ``max_points`` clicks (or the newest prompt only)."""
        if self.options.newest_click_only:
            return list(prompts[-1:])
        # By position, not equality: a click repeated at the same spot is still one of the newest only once.
        clicks = [i for i, p in enumerate(prompts) if not p.is_box]
        recent = set(clicks[-self.options.max_points :])
        return [p for i, p in enumerate(prompts) if p.is_box or i in recent]

    def _decoder_inputs(
        self, crop: CropGrid, prompts, use: list[Prompt], locked: bool, low_prev, low_override
    ) -> DecoderInputs:
        """Crop-space tensors for the decoder: points (1, N, 3) in crop voxels (x, y, z) and labels (1, N), the
        box corners (1, 2, 3) for models with box embeddings (else the box is its centre click), and the mask
        prompt (1, 1, L, L, L): the override, the previous logits, the box as logits, or zeros."""
        # Voxel indices first, then one coordinate transform for all of them (per-point numpy calls add up to
        # ~0.2 ms per click for 10 clicks right after the decoder has flushed the caches).
        ijk, labels, clip, boxes = [], [], [], None
        for p in use:
            if p.is_box:
                if self.model.prompt_encoder.supports_boxes:
                    corners = crop.ras_to_crop(self.geometry.ijk_to_ras(np.stack([p.ijk, p.box_hi])))
                    boxes = torch.as_tensor(np.sort(corners, axis=0), dtype=self.dtype, device=self.device)[None]
                else:
                    ijk.append(p.centre)
                    labels.append(1)
                    clip.append(False)
            else:
                ijk.append(p.ijk)
                labels.append(1 if p.include else 0)
                clip.append(locked)  # a locked crop keeps clicks on its faces
        box = next((p for p in prompts if p.is_box), None)
        lr = self.model.low_res_size
        if low_override is not None:
            mask_in = low_override
        elif low_prev is not None:
            mask_in = low_prev
        elif box is not None and self.options.box_strategy == "center_click_mask_prompt" and boxes is None:
            mask_in = self._box_logits(box, crop)
        else:
            mask_in = torch.zeros(1, 1, lr, lr, lr, dtype=self.dtype, device=self.device)
        pts = lab = None
        if ijk:
            xyz = crop.ras_to_crop(self.geometry.ijk_to_ras(np.asarray(ijk, dtype=np.float64)))
            clip = np.asarray(clip, dtype=bool)
            xyz[clip] = np.clip(xyz[clip], 0, crop.size - 1)
            pts = torch.as_tensor(xyz, dtype=self.dtype, device=self.device)[None]
            lab = torch.as_tensor(labels, device=self.device)[None]
        return DecoderInputs(pts, lab, boxes, mask_in.to(self.dtype))

    def _box_logits(self, box: Prompt, crop: CropGrid) -> torch.Tensor:
        """Low-res mask prompt: +box_logit inside the box, -box_logit outside."""
        lr = self.model.low_res_size
        f = crop.size / lr
        corners = crop.ras_to_crop(self.geometry.ijk_to_ras(np.stack([box.ijk, box.box_hi])))
        lo, hi = corners.min(0), corners.max(0)
        centres = (np.arange(lr) + 0.5) * f - 0.5  # crop coordinate of each low-res voxel centre
        inside = [(centres >= lo[a]) & (centres <= hi[a]) for a in range(3)]
        m = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        v = self.options.box_logit
        t = torch.from_numpy(np.where(m, v, -v).astype(np.float32))
        return t.to(self.device, self.dtype)[None, None]

    def _shift_logits(self, low: torch.Tensor, old: CropGrid, new: CropGrid) -> torch.Tensor:
        """Previous low-res logits resampled into the new crop's low-res grid (0, 'no information', outside)."""
        lr = low.shape[-1]
        f = new.size / lr
        centres = (np.arange(lr) + 0.5) * f - 0.5
        g = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1)  # new crop coords, [x, y, z, 3]
        old_xyz = old.ras_to_crop(new.crop_to_ras(g))
        u = (old_xyz + 0.5) * (2.0 / old.size) - 1.0
        grid = torch.as_tensor(u[..., ::-1].copy(), dtype=torch.float32, device=low.device)[None]
        out = torch.nn.functional.grid_sample(
            low.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out.to(low.dtype)

    def _apply(self, seg: Segment, prompts: tuple[Prompt, ...]) -> Region | None:
        """Model steps for ``prompts`` from the first one that differs from the segment's placed prompts, then
        one commit (one undo step)."""
        t0 = time.perf_counter()
        misses = self.cache.misses
        old = seg.state
        m = 0
        while m < min(len(old.placed), len(prompts)) and old.placed[m] == prompts[m]:
            m += 1
        # Restart from the newest state kept at or before the last unchanged prompt (older ones are dropped).
        while m and old.chain[m - 1] is None:
            m -= 1
        chain = list(old.chain[:m])
        state = chain[-1] if chain else old.base()
        low = state.low_res
        for p in prompts[m:]:
            state, low = self._predict(replace(state, prompts=state.prompts + (p,)), p, low_override=None)
            chain.append(state)
        # A state per prompt is one low-res logit volume (128 KB at 32^3): only the newest ones are kept.
        keep = self.options.max_chain_states
        chain[: max(0, len(chain) - keep)] = [None] * max(0, len(chain) - keep)
        # The result replaces this segment's previous one, except that prompts added in a new crop keep the mask
        # built so far in the old one (as clicks do).
        clear = None if m == len(old.placed) and state.crop != old.crop else old.last_region
        state = replace(state, placed=prompts, chain=tuple(chain), last_region=clear)
        t1 = time.perf_counter()
        region = self._commit(seg, self._snapshot(old), state, low)
        t2 = time.perf_counter()
        self.last_timing = {
            "model_ms": (t1 - t0) * 1e3,
            "paste_ms": (t2 - t1) * 1e3,
            "total_ms": (t2 - t0) * 1e3,
            "encoded": self.cache.misses > misses,
            "decodes": len(prompts) - m,
        }
        return region

    def _commit(self, seg: Segment, before: PromptState, state: PromptState, low: torch.Tensor) -> Region | None:
        """Write the prediction of ``low`` into the segment's mask, tile by tile, and record one undo step."""
        geom = self.geometry
        new_region = positive_region(low, geom, state.crop)
        refine_cfg = self.options.edge_refine
        if refine_cfg is not None and new_region is not None:
            new_region = grown_region(new_region, refine_cfg.radius_voxels(geom.spacing), geom.size)
        region = (new_region or Region((0, 0, 0), (0, 0, 0))).union(state.last_region)
        box = next((p for p in state.prompts if p.is_box), None)
        edits: list[MaskEdit] = []
        if not region.empty:
            if refine_cfg is None:
                tiles = sample_tiles(low, geom, state.crop, region, self._scratch)
            else:
                tiles = [self._refined_tile(low, state.crop, region, new_region, refine_cfg, state.prompts)]
            # Tiles are written as they are sampled: should anything fail part-way, the written ones are put back.
            try:
                for tile in tiles:
                    if tile.region.empty:
                        continue
                    positive = tile.positive
                    if box is not None and self.options.clamp_to_box:
                        positive &= _box_mask(tile.region, box)
                    if self.options.overlap == "protect":
                        for other in self.segments.values():
                            if other.id != seg.id:
                                positive &= other.mask[tile.region.slices] == 0
                    current = seg.mask[tile.region.slices]
                    after = positive.view(np.uint8)
                    if tile.inside is not None:
                        after = np.where(tile.inside, after, current)
                    edit = MaskEdit.between(seg.id, tile.region, current, after)
                    if edit is not None:
                        edits.append(edit)
                        np.copyto(current, after)
            except BaseException:
                for e in reversed(edits):
                    e.undo(seg.mask)
                raise
        state.last_region = new_region
        seg.push(Step(seg.id, before, self._snapshot(state), edits), self.options.max_undo_bytes)
        seg.state = state
        return _bounding(edits)

    def _refined_tile(
        self,
        low: torch.Tensor,
        crop: CropGrid,
        region: Region,
        target: Region | None,
        cfg: EdgeRefineConfig,
        prompts: tuple[Prompt, ...] = (),
    ) -> Tile:
        """One tile over ``region``: the refined mask within ``target`` (the logits' positive bound, widened by
        the filter's reach), cleared elsewhere. The filter sees ``target`` only, never the rest of ``region``
        (the previous result's box, which depends on the history), so that the same prompts give the same mask
        whichever way they were placed."""
        sub, logits, inside = sample_logits(low, self.geometry, crop, region, self._scratch)
        positive = np.zeros(logits.shape, bool)
        if sub.empty or target is None:
            return Tile(sub, positive, inside)
        lo = [max(a, b) for a, b in zip(sub.lo, target.lo)]
        hi = [min(a, b) for a, b in zip(sub.hi, target.hi)]
        part = Region(tuple(lo), tuple(hi))
        if not part.empty:
            rel = tuple(slice(s.start - o, s.stop - o) for s, o in zip(part.slices, sub.lo[::-1]))
            positive[rel] = refine(logits[rel], self._voxels[part.slices], self.geometry.spacing, cfg)
        if inside is not None:
            positive &= inside
        if self.options.drop_islands is not None:
            keep = [np.rint(p.centre) for p in prompts if p.include or p.is_box]
            keep_kji = (np.array(keep, np.int64).reshape(-1, 3) - np.array(sub.lo))[:, ::-1]
            positive = drop_islands(positive, keep_kji, self.options.drop_islands)
        return Tile(sub, positive, inside)

    @staticmethod
    def _snapshot(state: PromptState) -> PromptState:
        # Tensors are never modified in place, so sharing them between snapshots is safe.
        return copy.copy(state)

    # -------------------------------------------------------------------------------------------- history
    def undo(self, segment: int | None = None) -> Region | None:
        """Undo the last step of a segment: mask bytes and prompts exactly as before. None if nothing to undo."""
        seg = self._segment(segment)
        step = seg.step_back()
        if step is None:
            return None
        for e in reversed(step.edits):
            e.undo(self.segments[e.segment].mask)
        seg.state = self._snapshot(step.before)
        return _bounding(step.edits)

    def redo(self, segment: int | None = None) -> Region | None:
        seg = self._segment(segment)
        step = seg.step_forward()
        if step is None:
            return None
        for e in step.edits:
            e.redo(self.segments[e.segment].mask)
        seg.state = self._snapshot(step.after)
        return _bounding(step.edits)

    def reset(self, segment: int | None = None) -> Region | None:
        """Clear a segment's mask and prompts (undoable)."""
        seg = self._segment(segment)
        nz = np.nonzero(seg.mask)
        before = self._snapshot(seg.state)
        edits = []
        region = None
        if nz[0].size:
            region = Region(
                (int(nz[2].min()), int(nz[1].min()), int(nz[0].min())),
                (int(nz[2].max()) + 1, int(nz[1].max()) + 1, int(nz[0].max()) + 1),
            )
            view = seg.mask[region.slices]
            edits.append(MaskEdit.between(seg.id, region, view, np.zeros_like(view)))
            view[...] = 0
        seg.state = PromptState()
        seg.push(Step(seg.id, before, self._snapshot(seg.state), edits), self.options.max_undo_bytes)
        return region

    # --------------------------------------------------------------------------------------------- export
    def labelmap(self, priority: str = "first") -> np.ndarray:
        """All segments as one [k, j, i] labelmap (value = segment id; uint8, or uint16 past 255 segments).
        Where segments overlap, the ``first`` (lowest id) or ``last`` segment wins."""
        geom = self._require_image()
        ids = sorted(self.segments)
        dtype = np.uint8 if (max(ids, default=0) <= 255) else np.uint16
        out = np.zeros(geom.size[::-1], dtype=dtype)
        for sid in ids if priority == "last" else reversed(ids):
            out[self.segments[sid].mask > 0] = sid
        return out

    def save_labelmap(self, path: str | os.PathLike, priority: str = "first") -> None:
        """Write :meth:`labelmap` with the volume's geometry (NIfTI, NRRD, ... by extension) via SimpleITK,
        atomically and verified (fileio.write_image): a failed write raises OSError and keeps any existing file."""
        img = sitk.GetImageFromArray(self.labelmap(priority))
        img.CopyInformation(self.image)
        write_image(img, path)


def _ijk_text(v) -> str:
    """(1.5, 2, 3) as a person reads it (numpy scalars print as np.float64(1.5))."""
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"


def _bounding(edits: list[MaskEdit]) -> Region | None:
    """The box around the changes of ``edits`` (None if there are none)."""
    region = None
    for e in edits:
        region = e.changed.union(region)
    return region


def _box_mask(region: Region, box: Prompt) -> np.ndarray:
    """Voxels of ``region`` ([k, j, i]) inside the box's index range (rounded to whole voxels)."""
    lo = np.floor(np.asarray(box.ijk) + 0.5).astype(int)
    hi = np.floor(np.asarray(box.box_hi) + 0.5).astype(int)
    axes = []
    for a in (2, 1, 0):
        idx = np.arange(region.lo[a], region.hi[a])
        axes.append((idx >= lo[a]) & (idx <= hi[a]))
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
