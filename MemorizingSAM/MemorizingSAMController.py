"""What the module does, without Slicer: prompts per segment in, masks per segment out.

The widget turns markups into world RAS positions (MemorizingSAMMRML) and calls this controller; the controller
maps them to voxel indices, runs MemorizingSAMLib.InteractiveSession (or the remote client with the same calls),
and hands back what to write. Every prompt change recomputes the segment from its prompts (so moving or deleting
a point works), as one undo step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from MemorizingSAMLib.session import InteractiveSession, Prompt


@dataclass
class SegmentPrompts:
    include: list[list[float]] = field(default_factory=list)  # world RAS
    exclude: list[list[float]] = field(default_factory=list)
    box: list[list[float]] | None = None  # [min corner, max corner] world RAS

    def to_json(self) -> dict:
        return {"include": self.include, "exclude": self.exclude, "box": self.box}

    @classmethod
    def from_json(cls, d: dict) -> SegmentPrompts:
        return cls(d.get("include", []), d.get("exclude", []), d.get("box"))


class MemorizingSAMController:
    """One volume, several named segments. ``world_to_ijk`` maps a world RAS point to the volume's (i, j, k)."""

    def __init__(self, model, world_to_ijk, memory=None, session: InteractiveSession | None = None):
        self.session = session or InteractiveSession(model, memory=memory)
        self.world_to_ijk = world_to_ijk
        self.segment_ids: dict[str, int] = {}
        self.prompts: dict[str, SegmentPrompts] = {}
        self.last_latency_ms = 0.0
        # The box of the mask the last update/undo/redo/reset changed (a MemorizingSAMLib Region), None if none:
        # the module copies only that part into the segment.
        self.last_region = None

    def set_volume(self, image) -> None:
        self.session.set_image(image)
        self.segment_ids.clear()
        self.prompts.clear()

    def _sid(self, name: str) -> int:
        if name not in self.segment_ids:
            self.segment_ids[name] = self.session.add_segment(name)
            self.prompts[name] = SegmentPrompts()
        return self.segment_ids[name]

    def update(self, name: str, include_world, exclude_world, box_world=None) -> np.ndarray:
        """Recompute segment ``name`` from all its current prompts (placed, moved or deleted); returns its mask.

        Order of prompts for the model: the box (if any), then include and exclude points in placement order
        (includes first: the first include click centres the crop)."""
        sid = self._sid(name)
        t = time.perf_counter()
        prompts = []
        if box_world is not None:
            a, b = (self.world_to_ijk(np.asarray(p)) for p in box_world)
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            prompts.append(Prompt(tuple(lo), True, tuple(hi)))
        prompts += [Prompt(tuple(self.world_to_ijk(np.asarray(p))), True) for p in include_world]
        prompts += [Prompt(tuple(self.world_to_ijk(np.asarray(p))), False) for p in exclude_world]
        self.last_region = self.session.set_prompts(prompts, sid)
        self.prompts[name] = SegmentPrompts(
            [list(map(float, p)) for p in include_world],
            [list(map(float, p)) for p in exclude_world],
            None if box_world is None else [list(map(float, p)) for p in box_world],
        )
        self.last_latency_ms = (time.perf_counter() - t) * 1e3
        return self.session.mask(sid)

    def undo(self, name: str) -> np.ndarray:
        self.last_region = self.session.undo(self._sid(name))
        return self.session.mask(self._sid(name))

    def redo(self, name: str) -> np.ndarray:
        self.last_region = self.session.redo(self._sid(name))
        return self.session.mask(self._sid(name))

    def reset(self, name: str) -> np.ndarray:
        self.last_region = self.session.reset(self._sid(name))
        self.prompts[name] = SegmentPrompts()
        return self.session.mask(self._sid(name))

    def mask(self, name: str) -> np.ndarray:
        return self.session.mask(self._sid(name))

    def prompts_json(self) -> dict:
        return {n: p.to_json() for n, p in self.prompts.items()}
