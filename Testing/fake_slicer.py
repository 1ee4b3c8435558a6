"""A minimal, documented fake of exactly the Slicer/VTK calls that MemorizingSAM/MemorizingSAMMRML.py makes.

Not a Slicer emulator: each fake implements one call's contract as Slicer documents it (matrices as 4x4,
RAS world coordinates, [k, j, i] arrays, parent transforms mapping node coordinates to world), so that the module's
MRML functions and its controller can be tested with the real library outside Slicer. The real thing is exercised
by MemorizingSAMTest inside Slicer.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import SimpleITK as sitk


class vtkMatrix4x4:
    def __init__(self):
        self.m = np.eye(4)

    def GetElement(self, r, c):
        return float(self.m[r, c])

    def MultiplyPoint(self, p):
        return tuple(self.m @ np.asarray(p, dtype=float))


class vtkGeneralTransform:
    def __init__(self):
        self.m = np.eye(4)

    def TransformPoint(self, p):
        return tuple((self.m @ np.array([*p, 1.0]))[:3])


class TransformNode:
    """Linear transform node: ``to_parent`` maps this node's coordinates to world (no nesting here)."""

    def __init__(self, to_parent: np.ndarray):
        self.to_parent = np.asarray(to_parent, dtype=float)


class vtkMRMLTransformNode:
    @staticmethod
    def GetTransformBetweenNodes(source, target, transform):
        # world -> target's coordinates: the inverse of target's to-world transform (source None = world)
        assert source is None
        transform.m = np.eye(4) if target is None else np.linalg.inv(target.to_parent)


class VolumeNode:
    def __init__(self, array_kji: np.ndarray, ijk_to_ras: np.ndarray, parent: TransformNode | None = None):
        self.array = array_kji
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
        self.parent = parent

    def GetIJKToRASMatrix(self, m):
        m.m = self.ijk_to_ras.copy()

    def GetRASToIJKMatrix(self, m):
        m.m = np.linalg.inv(self.ijk_to_ras)

    def GetParentTransformNode(self):
        return self.parent


class PointListNode:
    PositionDefined = 2

    def __init__(self):
        self.points: list[np.ndarray] = []

    def add_world(self, p):
        self.points.append(np.asarray(p, dtype=float))

    def GetNumberOfControlPoints(self):
        return len(self.points)

    def GetNthControlPointPositionStatus(self, i):
        return self.PositionDefined

    def GetNthControlPointPositionWorld(self, i, out):
        out[:] = list(self.points[i])


class Segment:
    def __init__(self, name):
        self.name, self.mask = name, None

    def GetLabelValue(self):
        return 1


class Segmentation:
    def __init__(self):
        self.segments: dict[str, Segment] = {}

    def GetSegmentIdBySegmentName(self, name):
        return next((sid for sid, s in self.segments.items() if s.name == name), "")

    def AddEmptySegment(self, sid, name, color):
        self.segments[sid] = Segment(name)
        return sid

    def GetSegment(self, sid):
        return self.segments[sid]


class SegmentationNode:
    def __init__(self):
        self.segmentation = Segmentation()
        self.reference = None
        self.attributes = {}
        self.full_writes = 0

    def GetSegmentation(self):
        return self.segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference = volume

    def SetAttribute(self, k, v):
        self.attributes[k] = v

    def GetAttribute(self, k):
        return self.attributes.get(k)


class LabelMapNode:
    array = None
    volume = None


def _install():
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4, vtk.vtkGeneralTransform = vtkMatrix4x4, vtkGeneralTransform
    slicer = types.ModuleType("slicer")
    slicer.vtkMRMLTransformNode = vtkMRMLTransformNode
    util = types.SimpleNamespace()

    def arrayFromVolume(node):
        return node.array

    def updateSegmentBinaryLabelmapFromArray(narray, segmentation_node, segment_id, reference_volume):
        segmentation_node.segmentation.segments[segment_id].mask = np.array(narray, dtype=np.uint8)
        segmentation_node.full_writes += 1

    def arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id):
        return None  # the fake has no shared labelmaps: the module falls back to the full write

    def saveNode(node, path):
        img = sitk.GetImageFromArray(node.array)
        m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ node.volume.ijk_to_ras  # IJK -> LPS
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(m[:3, 3].tolist())
        img.SetDirection((m[:3, :3] / spacing).reshape(-1).tolist())
        sitk.WriteImage(img, str(path))
        return True

    util.arrayFromVolume = arrayFromVolume
    util.updateSegmentBinaryLabelmapFromArray = updateSegmentBinaryLabelmapFromArray
    util.arrayFromSegmentInternalBinaryLabelmap = arrayFromSegmentInternalBinaryLabelmap
    util.saveNode = saveNode
    slicer.util = util

    class Scene:
        def AddNewNodeByClass(self, cls, name=None):
            assert cls == "vtkMRMLLabelMapVolumeNode"
            return LabelMapNode()

        def RemoveNode(self, node):
            pass

    class SegmentationsLogic:
        def ExportVisibleSegmentsToLabelmapNode(self, segmentation_node, labelmap, reference):
            out = np.zeros(reference.array.shape, np.uint8)
            for n, s in enumerate(segmentation_node.segmentation.segments.values(), start=1):
                if s.mask is not None:
                    out[(s.mask > 0) & (out == 0)] = n
            labelmap.array, labelmap.volume = out, reference
            return True

    slicer.mrmlScene = Scene()
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=SegmentationsLogic))
    sys.modules["vtk"], sys.modules["slicer"] = vtk, slicer


_install()
