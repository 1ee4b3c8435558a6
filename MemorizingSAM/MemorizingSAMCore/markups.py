"""The markups nodes that hold a segment's prompts: one include and one exclude point list and one box ROI per
(volume, segment), found by their attributes (not by name), and each placed prompt's tag in its control point's
description, so that a prompt keeps its identity through moves, undo and saved scenes.

Positions are world RAS (mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk

KINDS = ("include", "exclude", "box")
COLOURS = {"include": (0.1, 0.8, 0.2), "exclude": (0.9, 0.1, 0.1), "box": (0.9, 0.8, 0.1)}
VOLUME_ATTRIBUTE = "MemorizingSAM.Volume"
SEGMENT_ATTRIBUTE = "MemorizingSAM.Segment"
KIND_ATTRIBUTE = "MemorizingSAM.Kind"
TAG_PREFIX = "msam:"


@dataclass(frozen=True)
class Owner:
    volume_id: str
    segment_id: str
    kind: str


def owner(node) -> Owner | None:
    """Which volume, segment and prompt kind a markups node holds prompts for (None: not one of ours)."""
    if node is None:
        return None
    values = [node.GetAttribute(a) for a in (VOLUME_ATTRIBUTE, SEGMENT_ATTRIBUTE, KIND_ATTRIBUTE)]
    return Owner(*values) if all(values) and values[2] in KINDS else None


def adopt(node, volume_id: str, segment_id: str, kind: str) -> None:
    node.SetAttribute(VOLUME_ATTRIBUTE, volume_id)
    node.SetAttribute(SEGMENT_ATTRIBUTE, segment_id)
    node.SetAttribute(KIND_ATTRIBUTE, kind)


def prompt_nodes(scene, volume_id: str, segment_id: str, kind: str) -> list:
    """The scene's markups nodes holding ``kind`` prompts of that volume's segment, oldest first."""
    cls = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
    nodes = scene.GetNodesByClass(cls)
    out = []
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if owner(node) == Owner(volume_id, segment_id, kind):
            out.append(node)
    return out


def new_prompt_node(scene, volume_id: str, segment_id: str, segment_name: str, kind: str):
    cls = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
    node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(f"{segment_name} {kind}"))
    adopt(node, volume_id, segment_id, kind)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*COLOURS[kind])
        display.SetColor(*COLOURS[kind])
        # Labels ("Segment_1 include-3") would cover the image beside every click; the colour says the kind.
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(False)
        if kind == "box":
            display.SetFillVisibility(False)  # a filled box would tint the segment it prompts
    return node


def point_tag(node, index: int) -> str | None:
    text = node.GetNthControlPointDescription(index)
    return text if text.startswith(TAG_PREFIX) else None


def set_point_tag(node, index: int, tag: str) -> None:
    node.SetNthControlPointDescription(index, tag)


def defined_points(node) -> list[tuple[int, str | None, np.ndarray]]:
    """(index, tag or None, world RAS position) of a point list's placed control points (a preview point that
    follows the mouse in place mode is not placed)."""
    out = []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        out.append((i, point_tag(node, i), np.array(p)))
    return out


def set_points(node, points: list[tuple[str, list[float]]]) -> None:
    """Make the point list hold exactly ``points`` (tag, world RAS position), in that order."""
    node.RemoveAllControlPoints()
    for tag, world in points:
        i = node.AddControlPointWorld(vtk.vtkVector3d(*world))
        set_point_tag(node, i, tag)
