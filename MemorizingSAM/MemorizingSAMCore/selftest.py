"""The module's self-test scenarios on a real scene: the in-Slicer test (MemorizingSAMTest) runs them on Slicer's
sample data, and ``make test`` runs them on Slicer's core (slicer-core) on our shipped sample. They place points the
way Slicer's markups widget does (a preview point that follows the mouse, defined on click), through the markups
display node, and check the segment in the segmentation node. Each raises AssertionError with a message."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from . import markups, mrml


def _preview(node, world_ras, view_id: str) -> int:
    """A preview point at ``world_ras`` (the mouse in place mode), added through the markups display node."""
    event = slicer.vtkMRMLInteractionEventData()
    event.SetWorldPosition([float(v) for v in world_ras[:3]])
    return node.GetDisplayNode().UpdateActiveControlPointWorld(-1, event, _IDENTITY, view_id, "", node.PositionPreview)


_IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def place_point(node, world_ras, view_id: str = "vtkMRMLSliceNodeRed") -> int:
    """A click in place mode, as Slicer's markups widget makes it: a preview point at the mouse, then defined."""
    index = _preview(node, world_ras, view_id)
    event = slicer.vtkMRMLInteractionEventData()
    event.SetWorldPosition([float(v) for v in world_ras[:3]])
    display = node.GetDisplayNode()
    return display.UpdateActiveControlPointWorld(index, event, _IDENTITY, view_id, "", node.PositionDefined)


def hover_then_leave(node, world_ras, view_id: str = "vtkMRMLSliceNodeRed") -> None:
    """The mouse over a view in place mode, then out of it: a preview point appears and is removed."""
    node.RemoveNthControlPoint(_preview(node, world_ras, view_id))


def place_box(roi_node, corner_a, corner_b, view_id: str = "vtkMRMLSliceNodeRed") -> None:
    """An ROI placed with two clicks at opposite corners (world RAS), as Slicer's markups widget does it."""
    place_point(roi_node, corner_a, view_id)
    place_point(roi_node, corner_b, view_id)


def click(logic, world_ras, include: bool = True, segment_id: str | None = None) -> None:
    """An include (exclude) click into a segment's point list, and the result delivered."""
    segment_id = segment_id or logic.current
    kind = "include" if include else "exclude"
    node = markups.prompt_nodes(logic.scene, logic.volume.GetID(), segment_id, kind)[-1]
    place_point(node, world_ras)
    logic.wait()


def check_click_second_segment_and_export(logic, ras_target, ras_other, export_path: str) -> None:
    """A click segments the structure under it; a second segment clicked nearby leaves the first exactly as it
    was (own layers); the export reads back on the volume's grid."""
    volume = logic.volume
    first = logic.add_segment("first")
    click(logic, ras_target)
    seg = logic.segmentation
    mask = mrml.segment_array(seg, first, volume)
    assert mask.sum() > 0, "the first click left the segment empty"
    i, j, k = np.round(mrml.world_to_ijk(volume, [ras_target])[0]).astype(int)
    assert mask[k, j, i] == 1, "the clicked voxel is not in the segment"
    second = logic.add_segment("second")
    click(logic, ras_other)
    assert mrml.segment_array(seg, second, volume).sum() > 0, "the second segment is empty"
    assert np.array_equal(mrml.segment_array(seg, first, volume), mask), "the second segment changed the first"
    logic.export(export_path)
    import SimpleITK as sitk

    back = sitk.ReadImage(export_path)
    assert back.GetSize() == volume.GetImageData().GetDimensions(), "the export does not cover the volume"
    labels = sitk.GetArrayFromImage(back)
    assert (labels[mask > 0] > 0).all(), "the export lost voxels of the first segment"


def check_transformed_volume(logic, ijk) -> None:
    """On a volume under a parent transform (and oblique), a click at the world position of voxel ``ijk`` gives a
    segment containing that voxel."""
    volume = logic.volume
    world = mrml.ijk_to_world(volume, [ijk])[0]
    segment_id = logic.add_segment("transformed")
    click(logic, world)
    mask = mrml.segment_array(logic.segmentation, segment_id, volume)
    i, j, k = np.round(ijk).astype(int)
    assert mask[k, j, i] == 1, "the segment does not hold the clicked voxel"


def rotate_and_move(volume_node, degrees: float = 30.0, offset=(15.0, -10.0, 5.0)):
    """Put ``volume_node`` under a linear transform (rotation about S, then a shift); returns the transform node."""
    scene = volume_node.GetScene()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = vtk.vtkTransform()
    t.Translate(*offset)
    t.RotateZ(degrees)
    transform.SetMatrixTransformToParent(t.GetMatrix())
    volume_node.SetAndObserveTransformNodeID(transform.GetID())
    return transform
