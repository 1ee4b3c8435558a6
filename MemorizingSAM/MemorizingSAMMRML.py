"""The only code of the module that touches MRML/VTK: a few small functions, each one Slicer call pattern.

Everything else (MemorizingSAMController and MemorizingSAMLib) works on numpy arrays and SimpleITK images, so it
is tested outside Slicer against Testing/fake_slicer.py, a fake of exactly the calls below.

Coordinates: Slicer's world is RAS. A control point's world position goes through the inverse of the volume's
parent transforms into the volume's own RAS, then through RASToIJK into continuous (i, j, k) voxel indices;
volume arrays are [k, j, i]. SimpleITK images built here are LPS (first two axes of RAS negated).
"""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

PROMPTS_ATTRIBUTE = "MemorizingSAM.Prompts"


def _slicer():
    import slicer

    return slicer


def volume_to_sitk(volume_node) -> sitk.Image:
    """The volume as a SimpleITK image with its own geometry (one copy of the voxels)."""
    slicer = _slicer()
    import vtk

    arr = slicer.util.arrayFromVolume(volume_node)  # [k, j, i] view
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    img.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).reshape(-1)])
    return img


def world_to_ijk(volume_node, point_world_ras) -> np.ndarray:
    """World RAS point -> the volume's continuous (i, j, k), through the volume's parent transforms."""
    slicer = _slicer()
    import vtk

    t = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), t)
    p = t.TransformPoint([float(v) for v in point_world_ras[:3]])
    m = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(m)
    return np.array(m.MultiplyPoint([p[0], p[1], p[2], 1.0])[:3])


def control_points_world(point_list_node) -> list[np.ndarray]:
    """World RAS positions of a markups point list's defined control points."""
    out = []
    for i in range(point_list_node.GetNumberOfControlPoints()):
        if not point_list_node.GetNthControlPointPositionStatus(i) == point_list_node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        point_list_node.GetNthControlPointPositionWorld(i, p)
        out.append(np.array(p))
    return out


def roi_corners_world(roi_node) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world RAS bounds of a markups ROI: (min corner, max corner)."""
    b = [0.0] * 6
    roi_node.GetRASBounds(b)
    return np.array(b[0::2]), np.array(b[1::2])


def ensure_segment(segmentation_node, volume_node, name: str, color=(0.9, 0.4, 0.1)) -> str:
    """The id of the segment called ``name``, created (empty) if missing; geometry follows the volume."""
    seg = segmentation_node.GetSegmentation()
    sid = seg.GetSegmentIdBySegmentName(name)
    if not sid:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        sid = seg.AddEmptySegment(name, name, list(color))
    return sid


def write_segment(segmentation_node, segment_id: str, volume_node, mask_kji: np.ndarray) -> None:
    """Write a segment's whole uint8 [k, j, i] mask in the volume's geometry. Other segments are untouched."""
    slicer = _slicer()
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask_kji, segmentation_node, segment_id, volume_node)


def write_segment_region(segmentation_node, segment_id: str, volume_node, mask_kji: np.ndarray, slices) -> bool:
    """Write only ``mask_kji[slices]`` into the segment's internal labelmap (the fast path: no full-volume copy).

    The internal labelmap may be shared with other segments (each has its own label value in it) and may cover
    less than the volume; when it does not cover the volume's grid, returns False and the caller writes the whole
    mask with :func:`write_segment`."""
    slicer = _slicer()
    seg = segmentation_node.GetSegmentation().GetSegment(segment_id)
    arr = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
    if arr is None or tuple(arr.shape) != tuple(mask_kji.shape):
        return False
    value = seg.GetLabelValue()
    region = arr[slices]
    new = mask_kji[slices] > 0
    region[new] = value
    region[(~new) & (region == value)] = 0
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    labelmap.Modified()
    seg.Modified()
    return True


def export_labelmap(segmentation_node, volume_node, path: str) -> None:
    """All segments as one labelmap with the reference volume's geometry (not cropped), saved to ``path``."""
    slicer = _slicer()
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
            segmentation_node, labelmap, volume_node
        )
        if not slicer.util.saveNode(labelmap, path):
            raise RuntimeError(f"could not write {path}")
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)


def save_prompts(segmentation_node, prompts: dict) -> None:
    """Store the prompts of every segment in the scene (an attribute of the segmentation node)."""
    segmentation_node.SetAttribute(PROMPTS_ATTRIBUTE, json.dumps(prompts))


def load_prompts(segmentation_node) -> dict:
    text = segmentation_node.GetAttribute(PROMPTS_ATTRIBUTE)
    return json.loads(text) if text else {}
