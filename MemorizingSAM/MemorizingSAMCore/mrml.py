"""The module's MRML call patterns: volumes and points in, segments and files out. Numpy in and out.

Coordinates: Slicer's world is RAS. A control point's world position goes through the inverse of the volume's
parent transforms into the volume's own RAS, then through RASToIJK into continuous (i, j, k) voxel indices; volume
and mask arrays are [k, j, i]. SimpleITK images made here are LPS (the first two axes of RAS negated).

Runs in Slicer and on Slicer's core alone (the ``slicer-core`` wheel): no Qt, no ``slicer.app``.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

PROMPTS_ATTRIBUTE = "MemorizingSAM.Prompts"


class VolumeError(ValueError):
    """A node that cannot be segmented (a labelmap, no image data, not 3D)."""


def matrix_to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK -> (its own, untransformed) RAS matrix."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return matrix_to_array(m)


def check_volume(volume_node) -> None:
    """Raise :class:`VolumeError` naming the problem if ``volume_node`` cannot be segmented."""
    if volume_node is None:
        raise VolumeError("no volume selected")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VolumeError(f"{volume_node.GetName()} is a labelmap; choose an image volume")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise VolumeError(f"{volume_node.GetName()} is a {volume_node.GetClassName()}, not a scalar volume")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise VolumeError(f"{volume_node.GetName()} has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise VolumeError(f"{volume_node.GetName()} has {image.GetNumberOfScalarComponents()} components (RGB?)")


def volume_to_sitk(volume_node) -> sitk.Image:
    """The volume as a SimpleITK image in its own (untransformed) geometry: one copy of the voxels."""
    check_volume(volume_node)
    arr = slicer.util.arrayFromVolume(volume_node)  # [k, j, i] view
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    img.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).reshape(-1)])
    return img


def world_to_ijk(volume_node, points_world) -> np.ndarray:
    """World RAS points (N, 3) -> the volume's continuous (i, j, k) (N, 3), through its parent transforms."""
    t = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), t)
    local = np.array([t.TransformPoint([float(v) for v in p[:3]]) for p in np.atleast_2d(points_world)])
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume_node))
    return local @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]


def ijk_to_world(volume_node, points_ijk) -> np.ndarray:
    """The inverse of :func:`world_to_ijk`: (N, 3) continuous (i, j, k) -> world RAS (N, 3)."""
    m = ijk_to_ras(volume_node)
    local = np.atleast_2d(points_ijk) @ m[:3, :3].T + m[:3, 3]
    t = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_node.GetParentTransformNode(), None, t)
    return np.array([t.TransformPoint([float(v) for v in p]) for p in local])


def roi_box_ijk(roi_node, volume_node) -> tuple[np.ndarray, np.ndarray] | None:
    """The (i, j, k) box around all eight corners of a markups ROI (rotated ROIs, oblique or transformed volumes),
    clipped to the volume: (low corner, high corner). None while the ROI is not fully placed (Slicer places it with
    two clicks; after the first its size is zero) or when it misses the volume."""
    if roi_node.GetNumberOfDefinedControlPoints() < max(1, roi_node.GetRequiredNumberOfControlPoints()):
        return None
    size = np.array(roi_node.GetSize(), dtype=float)
    if np.any(size <= 0):
        return None
    to_world = matrix_to_array(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = signs * size / 2
    world = corners @ to_world[:3, :3].T + to_world[:3, 3]
    ijk = world_to_ijk(volume_node, world)
    dims = np.array(volume_node.GetImageData().GetDimensions(), dtype=float)
    lo, hi = np.maximum(ijk.min(0), 0.0), np.minimum(ijk.max(0), dims - 1)
    if np.any(hi - lo < 1e-6):
        return None
    return lo, hi


def roi_geometry(roi_node) -> dict:
    """What restores an ROI exactly (after undo): its object-to-node matrix (centre and axes, in the ROI's own
    coordinates) and its size in mm along those axes."""
    return {
        "object_to_node": matrix_to_array(roi_node.GetObjectToNodeMatrix()).tolist(),
        "size": list(roi_node.GetSize()),
    }


def set_roi_geometry(roi_node, geometry: dict) -> None:
    """Place ``roi_node`` as :func:`roi_geometry` recorded it (a placed ROI: one control point, its centre)."""
    with slicer.util.NodeModify(roi_node):
        roi_node.SetAndObserveObjectToNodeMatrix(_vtk_matrix(np.asarray(geometry["object_to_node"], dtype=float)))
        roi_node.SetSize(*geometry["size"])


# ------------------------------------------------------------------------------------------------- segments
def new_segment(segmentation_node, volume_node, name: str, color=(0.9, 0.4, 0.1)) -> str:
    """A new empty segment in a labelmap layer of its own (AddEmptySegment puts it into an existing shared
    layer, where writing its voxels would overwrite the other segments); returns its id."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.AddEmptySegment("", name, list(color))
    separate_layer(segmentation_node, segment_id)
    return segment_id


def shares_layer(segmentation_node, segment_id: str) -> bool:
    """Whether ``segment_id`` shares its labelmap layer with other segments (Segment Editor collapses layers)."""
    shared: list[str] = []
    segmentation_node.GetSegmentation().GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, shared, False)
    return bool(shared)


def separate_layer(segmentation_node, segment_id: str) -> None:
    """Move ``segment_id`` into a labelmap layer of its own if it shares one (the other segments keep theirs)."""
    shared: list[str] = []
    segmentation = segmentation_node.GetSegmentation()
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, shared, False)
    if shared:
        segmentation.SeparateSegmentLabelmap(segment_id)


def _internal_labelmap(segmentation_node, segment_id: str, volume_node):
    """The segment's own internal labelmap, allocated on the volume's voxel grid. A new segment's labelmap is
    empty (no voxels) until written; one made elsewhere (Segment Editor, a loaded file) may cover only part of
    the volume or share a layer: both are brought to a layer of their own on the volume's grid, voxels kept."""
    separate_layer(segmentation_node, segment_id)
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    dims = volume_node.GetImageData().GetDimensions()
    want = ijk_to_ras(volume_node)
    if image is not None and image.GetPointData().GetScalars() is not None:
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        if (
            tuple(image.GetExtent()) == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
            and np.allclose(matrix_to_array(m), want, atol=1e-6)
            and image.GetScalarType() == vtk.VTK_UNSIGNED_CHAR
        ):
            return image
    # (Re)allocate on the volume's grid: the current voxels go through Slicer's own resampling.
    current = None
    if image is not None and image.GetPointData().GetScalars() is not None and image.GetNumberOfPoints() > 0:
        current = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    fresh = slicer.vtkOrientedImageData()
    fresh.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    fresh.SetImageToWorldMatrix(_vtk_matrix(want))
    fresh.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    arr = numpy_support.vtk_to_numpy(fresh.GetPointData().GetScalars())
    arr[:] = 0
    if current is not None:
        arr.reshape(dims[::-1])[current > 0] = value
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(fresh, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not allocate the labelmap of segment {segment_id}")
    separate_layer(segmentation_node, segment_id)
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if tuple(image.GetDimensions()) != tuple(dims):
        # Slicer shrank the extent to the non-empty voxels: write the full grid directly into the layer.
        image.DeepCopy(fresh)
    return image


def _vtk_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def write_segment_region(segmentation_node, segment_id: str, volume_node, region_kji: np.ndarray, slices) -> None:
    """Write ``region_kji`` (uint8 0/1, the voxels ``slices`` of the volume's [k, j, i] grid) into the segment,
    in place in its own internal labelmap: no full-volume copy, and no other segment touched."""
    image = _internal_labelmap(segmentation_node, segment_id, volume_node)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    arr[slices] = region_kji * np.uint8(segment.GetLabelValue())
    image.Modified()
    segment.Modified()  # what Slicer documents after editing an internal labelmap in place


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A copy of the segment as uint8 0/1 on the volume's [k, j, i] grid (through Slicer's export)."""
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    return (arr > 0).astype(np.uint8)


def atomic_write(node, path: str) -> None:
    """Save ``node`` through its default storage node to ``path``, atomically: a failed write leaves any existing
    file as it was."""
    path = os.path.abspath(path)
    folder, base = os.path.split(path)
    ext = next((e for e in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd") if base.endswith(e)), None)
    if ext is None:
        raise ValueError(f"{path}: export to .nii.gz, .nii, .nrrd, .seg.nrrd or .mha")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder")
    fd, tmp = tempfile.mkstemp(prefix=base[: -len(ext)] + ".", suffix=ext, dir=folder)
    os.close(fd)
    storage = node.CreateDefaultStorageNode()
    try:
        storage.SetFileName(tmp)
        storage.SetUseCompression(1)
        if not storage.WriteData(node):
            raise OSError(f"could not write {path}: {storage.GetWriteStateAsString()}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_labelmap(segmentation_node, volume_node, path: str, scene=None) -> None:
    """All visible segments as one labelmap on the reference volume's grid (not cropped), saved to ``path``;
    ``.seg.nrrd`` saves the segmentation itself (overlapping segments kept)."""
    if path.endswith(".seg.nrrd"):
        atomic_write(segmentation_node, path)
        return
    scene = scene or segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
            segmentation_node, labelmap, volume_node
        )
        if not ok:
            raise RuntimeError("Slicer could not export the segments to a labelmap")
        atomic_write(labelmap, path)
    finally:
        scene.RemoveNode(labelmap)


def save_prompts(segmentation_node, prompts: dict) -> None:
    """Store every segment's prompts in the scene (an attribute of the segmentation node)."""
    segmentation_node.SetAttribute(PROMPTS_ATTRIBUTE, json.dumps(prompts))


def load_prompts(segmentation_node) -> dict:
    text = segmentation_node.GetAttribute(PROMPTS_ATTRIBUTE)
    return json.loads(text) if text else {}
