"""What a session takes and gives, without torch: prompts, the voxel region a result changed, prompt errors.

The remote client and the wire format (wire.py) use these, so that a viewer talking to a server elsewhere needs
only numpy and the standard library. Coordinates are (i, j, k) voxel indices of the volume; numpy arrays of the
volume and of masks are indexed [k, j, i].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PromptError(ValueError):
    """A prompt that cannot be used (outside the image, degenerate box, no segment ...)."""


@dataclass(frozen=True)
class Prompt:
    """A click (``box_hi`` None) at continuous index ``ijk``, or a box [ijk, box_hi] (inclusive voxel corners).

    ``tag`` is the caller's name for the prompt (a viewer's control-point id, say): the model never sees it, the
    session keeps it through undo and redo (:meth:`InteractiveSession.placed`), and two prompts are the same prompt
    only if their tags are equal too."""

    ijk: tuple[float, float, float]
    include: bool = True
    box_hi: tuple[float, float, float] | None = None
    tag: str | None = None

    @property
    def is_box(self) -> bool:
        return self.box_hi is not None

    @property
    def centre(self) -> np.ndarray:
        c = np.asarray(self.ijk, dtype=np.float64)
        return c if self.box_hi is None else (c + np.asarray(self.box_hi)) / 2


@dataclass(frozen=True)
class Region:
    """A box of voxels of the volume, half-open index ranges [lo, hi) in (i, j, k) order."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """numpy slices of a [k, j, i] array."""
        return (slice(self.lo[2], self.hi[2]), slice(self.lo[1], self.hi[1]), slice(self.lo[0], self.hi[0]))

    @property
    def empty(self) -> bool:
        return any(h <= l for l, h in zip(self.lo, self.hi))

    @property
    def voxels(self) -> int:
        return 0 if self.empty else int(np.prod(np.subtract(self.hi, self.lo)))

    def union(self, other: Region | None) -> Region:
        if other is None or other.empty:
            return self
        if self.empty:
            return other
        return Region(
            tuple(min(a, b) for a, b in zip(self.lo, other.lo)), tuple(max(a, b) for a, b in zip(self.hi, other.hi))
        )
