"""Request and response bodies of the inference server as pydantic models, so that /openapi.json documents every
body and FastAPI checks the requests. Types are strict: ``"include": "false"`` is refused, not read as true;
numbers are JSON numbers, not strings or booleans. Coordinates are (i, j, k) voxel indices of the volume.

:func:`validation_message` turns pydantic's errors into the one-line messages the server answers with (422).
"""

# pydantic evaluates these annotations at run time: Optional/Union keep them valid on Python 3.9.
# ruff: noqa: UP007, UP045
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]
Triplet = Annotated[list[Number], Field(min_length=3, max_length=3, description="(i, j, k) voxel indices")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PointIn(_Body):
    ijk: Triplet
    include: StrictBool = True
    tag: Optional[StrictStr] = None


class BoxIn(_Body):
    ijk_min: Triplet
    ijk_max: Triplet
    tag: Optional[StrictStr] = None


class PromptIn(_Body):
    """A click (``box_hi`` null) or a box from ``ijk`` to ``box_hi`` (inclusive voxel corners)."""

    ijk: Triplet
    include: StrictBool = True
    box_hi: Optional[Triplet] = None
    tag: Optional[StrictStr] = None


class PromptsIn(_Body):
    """The segment's prompts as they should be now; the session replays from the first one that changed."""

    prompts: list[PromptIn]


class RegionOut(BaseModel):
    """The changed part of the segment's mask: voxels [lo, hi) in (i, j, k), data = base64(zlib(uint8 [k, j, i]))."""

    lo: list[int]
    hi: list[int]
    data: str


class ClickOut(BaseModel):
    region: Optional[RegionOut] = Field(description="null when no voxel changed")
    timing: dict[str, Any] = Field(description="the session's timings of this call (ms) and counters")
    placed: list[PromptIn] = Field(description="the segment's prompts in placement order, tags included")


class SessionOut(BaseModel):
    session: str
    size: list[int] = Field(description="(i, j, k) voxels")
    spacing: list[float] = Field(description="mm")
    origin: list[float] = Field(description="LPS mm")
    direction: list[float] = Field(description="LPS, row-major 3x3")


class SegmentOut(BaseModel):
    segment: int


class DeletedOut(BaseModel):
    deleted: str


class HealthOut(BaseModel):
    status: str


class InfoOut(BaseModel):
    model: str
    device: str
    memory: bool
    limits: dict[str, Any]
    sessions: int
    queue: int = Field(description="requests waiting for or running on the model thread")
    service_ms: float = Field(description="recent mean time of one request's model work")
    threads: int
    cpu: dict[str, Any]


# What each field must be, said the way a user reads it (pydantic's own words name types, not intent).
FIELD_RULES = {
    "ijk": "a list of three numbers [i, j, k]",
    "ijk_min": "a list of three numbers [i, j, k]",
    "ijk_max": "a list of three numbers [i, j, k]",
    "box_hi": "a list of three numbers [i, j, k] or null",
    "include": "true or false",
    "tag": "a string or null",
    "prompts": "a list of prompts",
}


def validation_message(errors: list[dict]) -> str:
    """One line naming the first wrong field of a request body, what it must be and what it was."""
    if not errors:
        return "malformed request"
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "missing":
        return f"'{'.'.join(loc) or 'body'}' is missing"
    if e.get("type") == "extra_forbidden":
        return f"unknown field '{'.'.join(loc)}'"
    field = next((x for x in reversed(loc) if x in FIELD_RULES), None)
    where = ".".join(loc) or "body"
    if field is None:
        return f"'{where}': {e.get('msg', 'invalid')}"
    value = e.get("input")
    # For an element of a triplet, name the whole field and show what was sent for it.
    return f"'{where}' must be {FIELD_RULES[field]}, got {value!r}"
