"""The interface every front end segments through: InteractiveSession (in process) and RemoteSession (a server
elsewhere) both satisfy it, and the Slicer module's logic and the evaluation harness use only this.

Typing only (no torch, no numpy at run time beyond annotations). Coordinates are continuous (i, j, k) voxel
indices of the volume; masks are uint8 arrays indexed [k, j, i] on the volume's grid; every editing call returns
the region of the mask it changed (or None) so that a caller copies only that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .prompts import Prompt, Region


@runtime_checkable
class SegmentationSession(Protocol):
    last_timing: dict[str, Any]

    def set_image(self, image, spacing=None, origin=None, direction=None) -> Any:
        """A path, a SimpleITK image, or a [k, j, i] array with spacing (mm, i j k), LPS origin and direction."""

    def add_segment(self, name: str | None = None) -> int: ...

    def remove_segment(self, segment: int) -> None: ...

    def add_point(self, ijk, include: bool = True, segment: int | None = None) -> Region | None: ...

    def add_box(self, ijk_min, ijk_max, segment: int | None = None) -> Region | None: ...

    def set_prompts(self, prompts: Sequence[Prompt], segment: int | None = None) -> Region | None:
        """The segment's prompts as they should be now; decoding starts at the first changed one."""

    def placed(self, segment: int | None = None) -> tuple[Prompt, ...]: ...

    def undo(self, segment: int | None = None) -> Region | None: ...

    def redo(self, segment: int | None = None) -> Region | None: ...

    def reset(self, segment: int | None = None) -> Region | None: ...

    def mask(self, segment: int | None = None) -> np.ndarray: ...
