"""MemorizingSAM: interactive 3D segmentation in 3D Slicer (include/exclude points and boxes -> segments).

A thin module over MemorizingSAMLib: MemorizingSAMMRML.py holds the few functions that touch MRML,
MemorizingSAMController.py the logic; this file wires the GUI, the markups events and the worker thread.
"""

from __future__ import annotations

import hashlib
import os
import queue
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Published checkpoints the user can fetch on request. SHA256 None: not pinned yet, because these files could not
# be downloaded where this module was written; the module shows the computed hash after a download so that a
# site can pin it. Never downloaded without the user asking.
PUBLISHED_CHECKPOINTS = {
    "SAM-Med3D turbo": {
        "url": "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        "sha256": None,
        "config": "sam_med3d_vit_b",
    },
}
REQUIREMENTS = ("scipy",)  # numpy and SimpleITK ship with Slicer; torch comes from the PyTorch extension


class MemorizingSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MemorizingSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MemorizingSAM developers"]
        self.parent.helpText = (
            "Interactive 3D segmentation: place include/exclude points or a box; each change updates the selected "
            "segment. Runs SAM-Med3D / FastSAM3D / Memorizing SAM models locally or on a remote server."
        )
        self.parent.acknowledgementText = "Models: SAM-Med3D, FastSAM3D, Memorizing SAM (see the README)."


def ensure_dependencies(ask: bool = True) -> bool:
    """Install what the library needs, on the GUI thread, after asking. torch through the PyTorch extension when
    it is installed (it picks the CUDA build matching the GPU), else pip."""
    missing = []
    try:
        import torch  # noqa: F401
    except ImportError:
        missing.append("torch")
    for req in REQUIREMENTS:
        try:
            __import__(req)
        except ImportError:
            missing.append(req)
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
        f"MemorizingSAM needs {', '.join(missing)}. Install now? This can take several minutes."
    ):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                return False
        except ImportError:
            slicer.util.pip_install("torch")
        missing.remove("torch")
    if missing:
        slicer.util.pip_install(" ".join(missing))
    return True


class MemorizingSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._results = queue.Queue()
        self._busy = False
        self._pending = None
        # One thread for all model work, loading included: torch's thread pool belongs to the calling thread, and
        # a new thread per click would run several pools on the same cores (slower, see MemorizingSAMLib.server).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MemorizingSAM")

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        w = slicer.util.loadUI(self.resourcePath("UI/MemorizingSAM.ui"))
        self.layout.addWidget(w)
        self.ui = slicer.util.childWidgetVariables(w)
        w.setMRMLScene(slicer.mrmlScene)
        self.logic = MemorizingSAMLogic()
        self.ui.modelComboBox.addItems(
            ["Shipped default (memsam_tiny_student)", "Checkpoint file"] + list(PUBLISHED_CHECKPOINTS)
        )
        self.ui.deviceComboBox.addItems(["cpu", "cuda"])
        self.ui.segmentComboBox.addItem("Segment_1")
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.includePointButton.connect("toggled(bool)", lambda on: self.onPlaceTool("include", on))
        self.ui.excludePointButton.connect("toggled(bool)", lambda on: self.onPlaceTool("exclude", on))
        self.ui.boxButton.connect("toggled(bool)", lambda on: self.onPlaceTool("box", on))
        self.ui.undoButton.connect("clicked()", lambda: self.onHistory("undo"))
        self.ui.redoButton.connect("clicked()", lambda: self.onHistory("redo"))
        self.ui.resetButton.connect("clicked()", lambda: self.onHistory("reset"))
        self.ui.nextSegmentButton.connect("clicked()", self.onNextSegment)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.downloadButton.connect("clicked()", self.onDownload)
        for key, slot in (
            ("I", lambda: self.ui.includePointButton.toggle()),
            ("E", lambda: self.ui.excludePointButton.toggle()),
            ("B", lambda: self.ui.boxButton.toggle()),
            ("Ctrl+Z", lambda: self.onHistory("undo")),
            ("Ctrl+Y", lambda: self.onHistory("redo")),
        ):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
        self._timer = qt.QTimer()
        self._timer.setInterval(30)
        self._timer.connect("timeout()", self._deliver)
        self._timer.start()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        self._executor.shutdown(wait=False)

    # ---------------------------------------------------------------------------------------------- state
    def segmentName(self):
        return self.ui.segmentComboBox.currentText or "Segment_1"

    def onVolumeChanged(self, node):
        if node is None:
            return
        if not ensure_dependencies():
            self.ui.statusLabel.text = "Dependencies missing: MemorizingSAM is disabled."
            return
        self.ui.statusLabel.text = "Preparing the volume..."
        slicer.app.processEvents()
        self.logic.setVolume(
            node,
            self._modelChoice(),
            self.ui.memoryPathLineEdit.currentPath or None,
            self.ui.deviceComboBox.currentText,
            self.ui.serverUrlLineEdit.text.strip() or None,
        )
        self.ui.statusLabel.text = f"Ready: {node.GetName()} ({self.logic.modelDescription})"

    def _modelChoice(self):
        i = self.ui.modelComboBox.currentIndex
        if i == 1:
            return self.ui.checkpointPathLineEdit.currentPath
        if i >= 2:
            name = self.ui.modelComboBox.currentText
            return self.logic.publishedPath(name)
        return None

    def onPlaceTool(self, kind, on):
        if not on or self.logic.volume is None:
            return
        node = self.logic.promptNode(kind, self.segmentName())
        for event in (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        ):
            if not self.hasObserver(node, event, self.onPromptsChanged):
                self.addObserver(node, event, self.onPromptsChanged)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onPromptsChanged(self, caller=None, event=None):
        """A point placed, moved or deleted, or the ROI changed: recompute this segment off the GUI thread."""
        job = self.logic.collectPrompts(self.segmentName())
        if self._busy:
            self._pending = job  # only the newest state matters
            return
        self._start(job)

    def _start(self, job):
        self._busy = True
        self.ui.statusLabel.text = "Segmenting..."

        def work():
            try:
                self._results.put(("ok", job, self.logic.compute(job)))
            except Exception as e:  # reported on the GUI thread
                self._results.put(("error", job, e))

        self._executor.submit(work)

    def _deliver(self):
        try:
            status, job, result = self._results.get_nowait()
        except queue.Empty:
            return
        self._busy = False
        if status == "error":
            self.ui.statusLabel.text = f"Error: {result}"
        else:
            with slicer.util.RenderBlocker():
                self.logic.apply(job, result)
            self.ui.statusLabel.text = f"{job['segment']}: last click {self.logic.lastLatencyMs:.0f} ms"
        if self._pending is not None:
            job, self._pending = self._pending, None
            self._start(job)

    def onHistory(self, action):
        if self.logic.volume is None:
            return
        with slicer.util.RenderBlocker():
            self.logic.history(action, self.segmentName())

    def onNextSegment(self):
        n = self.ui.segmentComboBox.count + 1
        self.ui.segmentComboBox.addItem(f"Segment_{n}")
        self.ui.segmentComboBox.setCurrentIndex(n - 1)

    def onExport(self):
        path = self.ui.exportPathLineEdit.currentPath
        if not path:
            self.ui.statusLabel.text = "Choose a file to export to."
            return
        self.logic.export(path)
        self.ui.statusLabel.text = f"Exported {path}"

    def onDownload(self):
        name = self.ui.modelComboBox.currentText
        if name not in PUBLISHED_CHECKPOINTS:
            self.ui.statusLabel.text = "Select a published checkpoint in the Model list first."
            return
        if not slicer.util.confirmOkCancelDisplay(f"Download {name} from {PUBLISHED_CHECKPOINTS[name]['url']}?"):
            return
        path, digest = self.logic.download(name)
        self.ui.statusLabel.text = f"Downloaded {os.path.basename(path)}, SHA256 {digest[:16]}..."


class MemorizingSAMLogic(ScriptedLoadableModuleLogic):
    """MRML side of the module. The computation lives in MemorizingSAMController (tested without Slicer)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.volume = None
        self.segmentation = None
        self.controller = None
        self.modelDescription = ""
        self.lastLatencyMs = 0.0

    def setVolume(self, volume_node, model_path=None, memory_path=None, device="cpu", server_url=None, run=None):
        """``run(fn)`` executes model work (loading) on the thread that will compute the clicks."""
        run = run or (lambda fn: fn())
        import MemorizingSAMMRML as io
        from MemorizingSAMController import MemorizingSAMController

        from MemorizingSAMLib.checkpoints import load_model
        from MemorizingSAMLib.resources import default_model_path

        if server_url:
            try:
                from MemorizingSAMLib.client import RemoteSession  # same calls as InteractiveSession
            except ImportError:
                raise RuntimeError(
                    "remote mode needs MemorizingSAMLib.client, which this version does not have yet"
                ) from None
            session, model = RemoteSession(server_url), None
            self.modelDescription = f"remote {server_url}"
        else:
            model = run(lambda: load_model(model_path or default_model_path(), device=device).prepare_for_inference())
            session = None
            self.modelDescription = f"{model.cfg.name} on {device}"
        memory = None
        if memory_path and model is not None:
            from MemorizingSAMLib.memory_bank import MemoryBank

            memory = MemoryBank.load(memory_path, model)
        self.volume = volume_node
        self.controller = MemorizingSAMController(model, lambda p: io.world_to_ijk(volume_node, p), memory, session)
        self.controller.set_volume(io.volume_to_sitk(volume_node))
        self.segmentation = self._segmentationFor(volume_node)
        saved = io.load_prompts(self.segmentation)
        for name, p in saved.items():  # resume the work stored in the scene
            self.apply({"segment": name}, self.controller.update(name, p["include"], p["exclude"], p.get("box")))

    def _segmentationFor(self, volume_node):
        name = volume_node.GetName() + " MemorizingSAM"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return node

    def promptNode(self, kind, segment):
        """The markups node holding ``kind`` prompts (include / exclude points, box ROI) of ``segment``."""
        cls = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
        name = f"MemorizingSAM {segment} {kind}"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(cls, name)
            node.CreateDefaultDisplayNodes()
            color = {"include": (0.1, 0.8, 0.2), "exclude": (0.9, 0.1, 0.1), "box": (0.9, 0.8, 0.1)}[kind]
            node.GetDisplayNode().SetSelectedColor(*color)
        return node

    def collectPrompts(self, segment):
        import MemorizingSAMMRML as io

        job = {"segment": segment, "include": [], "exclude": [], "box": None}
        for kind in ("include", "exclude"):
            node = slicer.mrmlScene.GetFirstNodeByName(f"MemorizingSAM {segment} {kind}")
            if node is not None:
                job[kind] = [p.tolist() for p in io.control_points_world(node)]
        roi = slicer.mrmlScene.GetFirstNodeByName(f"MemorizingSAM {segment} box")
        if roi is not None and roi.GetNumberOfControlPoints() > 0:
            lo, hi = io.roi_corners_world(roi)
            job["box"] = [lo.tolist(), hi.tolist()]
        return job

    def compute(self, job):
        """Worker thread: no MRML here."""
        mask = self.controller.update(job["segment"], job["include"], job["exclude"], job["box"])
        self.lastLatencyMs = self.controller.last_latency_ms
        return mask

    def apply(self, job, mask):
        """GUI thread: write the segment (changed region only when possible) and store the prompts."""
        import MemorizingSAMMRML as io

        sid = io.ensure_segment(self.segmentation, self.volume, job["segment"])
        self._writeChanged(sid, mask)
        io.save_prompts(self.segmentation, self.controller.prompts_json())

    def _writeChanged(self, sid, mask):
        """Copy the part of ``mask`` the last controller call changed; the whole mask when that is unknown or the
        segment's internal labelmap does not cover the volume."""
        import MemorizingSAMMRML as io

        region = self.controller.last_region
        if region is None or not io.write_segment_region(self.segmentation, sid, self.volume, mask, region.slices):
            io.write_segment(self.segmentation, sid, self.volume, mask)

    def history(self, action, segment):
        import MemorizingSAMMRML as io

        mask = getattr(self.controller, action)(segment)
        sid = io.ensure_segment(self.segmentation, self.volume, segment)
        self._writeChanged(sid, mask)
        io.save_prompts(self.segmentation, self.controller.prompts_json())

    def export(self, path):
        import MemorizingSAMMRML as io

        if path.endswith(".seg.nrrd"):
            if not slicer.util.saveNode(self.segmentation, path):
                raise RuntimeError(f"could not write {path}")
        else:
            io.export_labelmap(self.segmentation, self.volume, path)

    def publishedPath(self, name):
        folder = os.path.join(slicer.app.cachePath, "MemorizingSAM")
        return os.path.join(folder, os.path.basename(PUBLISHED_CHECKPOINTS[name]["url"]))

    def download(self, name):
        entry = PUBLISHED_CHECKPOINTS[name]
        path = self.publishedPath(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        slicer.util.downloadFile(entry["url"], path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if entry["sha256"] and digest != entry["sha256"]:
            os.remove(path)
            raise RuntimeError(f"{name}: SHA256 {digest} does not match the registry ({entry['sha256']})")
        return path, digest


class MemorizingSAMTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: sample data, programmatic clicks, an oblique/transformed volume, export round trip."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_click_segments_and_export()
        self.setUp()
        self.test_transformed_oblique_volume()

    def _volume(self):
        import SampleData

        return SampleData.SampleDataLogic().downloadMRHead()

    @staticmethod
    def _centre(volume):
        """The volume's centre voxel (i, j, k) and its position in the volume's own RAS."""
        centre = np.array(volume.GetImageData().GetCenter())  # Slicer keeps image data in IJK units
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijk_to_ras)
        return centre, ijk_to_ras.MultiplyPoint([*centre, 1.0])[:3]

    def _click(self, logic, segment, ras, include=True):
        node = logic.promptNode("include" if include else "exclude", segment)
        node.AddControlPointWorld(vtk.vtkVector3d(*ras))
        job = logic.collectPrompts(segment)
        logic.apply(job, logic.compute(job))

    def test_click_segments_and_export(self):
        volume = self._volume()
        logic = MemorizingSAMLogic()
        logic.setVolume(volume)
        _, ras = self._centre(volume)
        t0 = time.time()
        self._click(logic, "Segment_1", ras)
        self.delayDisplay(f"first click {time.time() - t0:.2f} s")
        seg = logic.segmentation
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Segment_1")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)
        self.assertGreater(int(mask.sum()), 0)
        self._click(logic, "Segment_2", np.array(ras) + [20, 0, 0])
        mask_after = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)
        self.assertTrue(np.array_equal(mask, mask_after), "a second segment changed the first")
        path = os.path.join(slicer.app.temporaryPath, "memsam_test_labels.nrrd")
        logic.export(path)
        import SimpleITK as sitk

        back = sitk.ReadImage(path)
        self.assertEqual(back.GetSize(), volume.GetImageData().GetDimensions())
        self.delayDisplay("click, second segment and export round trip passed")

    def test_transformed_oblique_volume(self):
        volume = self._volume()
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        m = vtk.vtkTransform()
        m.RotateZ(30)
        m.Translate(15, -10, 5)
        transform.SetMatrixTransformToParent(m.GetMatrix())
        volume.SetAndObserveTransformNodeID(transform.GetID())
        logic = MemorizingSAMLogic()
        logic.setVolume(volume)
        centre, local = self._centre(volume)
        world = m.TransformPoint(local)  # where the user sees that voxel
        self._click(logic, "Segment_1", world)
        seg = logic.segmentation
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Segment_1")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)
        k, j, i = (int(round(v)) for v in centre[::-1])
        self.assertTrue(
            mask[max(0, k - 8) : k + 8, j - 8 : j + 8, i - 8 : i + 8].any(), "mask not at the clicked voxel"
        )
        self.delayDisplay("transformed volume passed")


if __name__ == "__main__":
    unittest.main()
