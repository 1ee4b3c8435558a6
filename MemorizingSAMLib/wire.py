"""The server's wire format, shared by the server and the torch-free client: numpy and the standard library only.

A changed region travels as {"lo": [i, j, k], "hi": [i, j, k], "data": base64(zlib(uint8 mask[k, j, i] of the
region))}; a prompt as {"ijk": [i, j, k], "include": bool, "box_hi": [i, j, k] or null, "tag": str or null}, in
voxel indices of the volume.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from .prompts import Prompt, Region


def encode_region(mask: np.ndarray, region: Region | None) -> dict | None:
    if region is None or region.empty:
        return None
    data = zlib.compress(np.ascontiguousarray(mask[region.slices]).tobytes(), 1)
    return {"lo": list(region.lo), "hi": list(region.hi), "data": base64.b64encode(data).decode()}


def decode_region_into(mask: np.ndarray, payload: dict | None) -> Region | None:
    if not payload:
        return None
    region = Region(tuple(payload["lo"]), tuple(payload["hi"]))
    shape = tuple(h - l for l, h in zip(region.lo[::-1], region.hi[::-1]))
    mask[region.slices] = np.frombuffer(zlib.decompress(base64.b64decode(payload["data"])), np.uint8).reshape(shape)
    return region


def prompt_to_json(p: Prompt) -> dict:
    """A prompt on the wire: voxel indices (i, j, k), polarity, the box's high corner, the caller's tag."""
    return {"ijk": list(p.ijk), "include": p.include, "box_hi": list(p.box_hi) if p.box_hi else None, "tag": p.tag}


def _triplet(v, what: str) -> tuple[float, float, float]:
    if (
        not isinstance(v, list)
        or len(v) != 3
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ):
        raise ValueError(f"{what} must be three numbers, got {v!r}")
    return tuple(float(x) for x in v)


def prompt_from_json(d: dict) -> Prompt:
    if not isinstance(d, dict):
        raise ValueError(f"a prompt must be an object, got {d!r}")
    tag = d.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"a prompt's tag must be a string, got {tag!r}")
    include = d.get("include", True)
    if not isinstance(include, bool):
        raise ValueError(f"'include' must be true or false, got {include!r}")
    box_hi = _triplet(d["box_hi"], "box_hi") if d.get("box_hi") is not None else None
    return Prompt(_triplet(d.get("ijk"), "ijk"), include, box_hi, tag)
