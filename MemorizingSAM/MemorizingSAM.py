"""MemorizingSAM: interactive 3D segmentation in 3D Slicer (include/exclude points and boxes -> segments).

This file is what Slicer loads: the module, its Qt widget, the logic class Slicer expects, and the self-test. Below
the widgets everything is MemorizingSAMCore (a package beside this file, so that Slicer does not load its files as
modules), which runs on Slicer's core alone and is tested there; the library (and torch) is imported only when a
model is loaded.
"""

from __future__ import annotations

import os
import threading
import unittest

import qt
import slicer
from MemorizingSAMCore import dependencies, remote, selftest
from MemorizingSAMCore.logic import ModelChoice, SegmentationLogic
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

DEFAULT_MODEL_NAME = "memsam_hq_geo"  # MemorizingSAMLib.resources.DEFAULT_MODEL_NAME, without importing torch

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

# Keys used by nobody else while the module is shown: Segment Editor takes Ctrl+Z / Ctrl+Y / z / y, the slice
# views b, f, r, v and others; Shift+letter is free in both.
SHORTCUTS = {"Shift+I": "include", "Shift+E": "exclude", "Shift+B": "box", "Shift+Z": "undo", "Shift+Y": "redo"}


class MemorizingSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MemorizingSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MemorizingSAM developers"]
        self.parent.helpText = (
            "Interactive 3D segmentation: place include/exclude points or a box; each click updates the selected "
            "segment. Runs SAM-Med3D / FastSAM3D / Memorizing SAM models locally or on a remote server. Keys while "
            "the module is shown: " + ", ".join(f"{k} {v}" for k, v in SHORTCUTS.items()) + "."
        )
        self.parent.acknowledgementText = "Models: SAM-Med3D, FastSAM3D, Memorizing SAM (see the README)."


def ensure_dependencies() -> bool:
    """Install what the library needs, on the GUI thread, after asking; torch through the PyTorch extension (it
    picks the CUDA build matching the GPU). False, with the reason shown, when it cannot be used."""
    problem = dependencies.torch_problem()
    if problem and "not installed" in problem:
        if not slicer.util.confirmOkCancelDisplay(f"{problem}. Install PyTorch now? This can take several minutes."):
            return False
        try:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                return False
        except ImportError:
            slicer.util.errorDisplay("Install the PyTorch extension (Extensions Manager), then restart Slicer.")
            return False
        problem = dependencies.torch_problem()
    if problem:
        slicer.util.errorDisplay(problem)
        return False
    missing = dependencies.missing_requirements()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(f"MemorizingSAM needs {', '.join(missing)}. Install now?"):
            return False
        slicer.util.pip_install(" ".join(missing))
    return True


class MemorizingSAMLogic(SegmentationLogic):
    """The module's logic: SegmentationLogic on the application's scene. Not a ScriptedLoadableModuleLogic: the
    module keeps no parameter node (its state is the segmentation and the markups), and SegmentationLogic must also
    run where that class does not exist (slicer-core)."""

    def __init__(self):
        SegmentationLogic.__init__(self, slicer.mrmlScene, slicer.app.applicationLogic())

    @staticmethod
    def publishedPath(name):
        folder = os.path.join(slicer.app.cachePath, "MemorizingSAM")
        return os.path.join(folder, os.path.basename(PUBLISHED_CHECKPOINTS[name]["url"]))


class MemorizingSAMWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self._shortcuts = []
        self._download = None  # (thread, progress dict)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        w = slicer.util.loadUI(self.resourcePath("UI/MemorizingSAM.ui"))
        self.layout.addWidget(w)
        self.ui = slicer.util.childWidgetVariables(w)
        w.setMRMLScene(slicer.mrmlScene)
        self.logic = MemorizingSAMLogic()
        self.logic.schedule = lambda fn: qt.QTimer.singleShot(0, fn)  # read markups once per event burst
        self.logic.on_status = lambda text: setattr(self.ui.statusLabel, "text", text)
        self.logic.on_tool = self._showTool
        self.logic.on_segments = self._showSegments
        self.logic.on_result = self._showResult
        self.ui.modelComboBox.addItems(
            [f"Shipped default ({DEFAULT_MODEL_NAME})", "Checkpoint file"] + list(PUBLISHED_CHECKPOINTS)
        )
        self.ui.deviceComboBox.addItems(["cpu", "cuda"])
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", lambda i: self._modelChanged())
        self.ui.segmentComboBox.connect("activated(int)", self.onSegmentSelected)
        self._tools = {"include": self.ui.includePointButton, "exclude": self.ui.excludePointButton}
        self._tools["box"] = self.ui.boxButton
        for kind, button in self._tools.items():
            button.connect("clicked(bool)", lambda on, kind=kind: self.onTool(kind if on else None))
        self.ui.undoButton.connect("clicked()", lambda: self.onHistory("undo"))
        self.ui.redoButton.connect("clicked()", lambda: self.onHistory("redo"))
        self.ui.resetButton.connect("clicked()", lambda: self.onHistory("reset"))
        self.ui.nextSegmentButton.connect("clicked()", self.onNextSegment)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.downloadButton.connect("clicked()", self.onDownload)
        # Remote mode: URL, token and certificate live in Slicer's settings (qt.QSettings), never in the scene.
        saved = remote.load_settings(qt.QSettings())
        self.ui.serverUrlLineEdit.text = saved.url
        self.ui.serverTokenLineEdit.text = saved.token
        self.ui.serverCaPathLineEdit.currentPath = saved.ca_file
        for edit in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit):
            edit.connect("editingFinished()", self._saveRemote)
        self.ui.serverCaPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._saveRemote())
        self.ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        # Results of the model thread are picked up here, only while work is pending.
        self._timer = qt.QTimer()
        self._timer.setInterval(5)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()
        self._modelChanged()

    def enter(self):
        self.installShortcuts()

    def exit(self):
        self.removeShortcuts()
        if self.logic is not None:
            self.logic.set_tool(None)

    def cleanup(self):
        self.removeShortcuts()
        self._timer.stop()
        if self.logic is not None:
            self.logic.close()

    def installShortcuts(self):
        self.removeShortcuts()
        actions = {
            "Shift+I": lambda: self._toggle("include"),
            "Shift+E": lambda: self._toggle("exclude"),
            "Shift+B": lambda: self._toggle("box"),
            "Shift+Z": lambda: self.onHistory("undo"),
            "Shift+Y": lambda: self.onHistory("redo"),
        }
        for key, slot in actions.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def removeShortcuts(self):
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

    # ------------------------------------------------------------------------------------------- callbacks
    def _poll(self):
        if self.logic is not None and self.logic.worker.busy:
            self.logic.process_events()
        if self._download is not None and self._download[1].get("text"):
            self.ui.statusLabel.text = self._download[1]["text"]
            if not self._download[0].is_alive():
                self._download = None

    def _remoteSettings(self) -> remote.RemoteSettings:
        return remote.RemoteSettings(
            self.ui.serverUrlLineEdit.text, self.ui.serverTokenLineEdit.text, self.ui.serverCaPathLineEdit.currentPath
        )

    def _saveRemote(self):
        remote.save_settings(qt.QSettings(), self._remoteSettings())

    def onTestConnection(self):
        self._saveRemote()
        ok, message = remote.check_connection(self._remoteSettings())
        self.ui.statusLabel.text = message
        if ok:
            self._modelChanged()

    def _modelChanged(self):
        if not ensure_dependencies():
            self.ui.statusLabel.text = "Dependencies missing: MemorizingSAM is disabled."
            return
        i = self.ui.modelComboBox.currentIndex
        checkpoint = None
        if i == 1:
            checkpoint = self.ui.checkpointPathLineEdit.currentPath or None
        elif i >= 2:
            checkpoint = self.logic.publishedPath(self.ui.modelComboBox.currentText)
            if not os.path.isfile(checkpoint):
                self.ui.statusLabel.text = "Download the selected checkpoint first."
                return
        choice = ModelChoice(
            checkpoint=checkpoint,
            memory=self.ui.memoryPathLineEdit.currentPath or None,
            device=self.ui.deviceComboBox.currentText,
            server_url=self.ui.serverUrlLineEdit.text.strip() or None,
            token=self.ui.serverTokenLineEdit.text.strip() or None,
            ca_file=self.ui.serverCaPathLineEdit.currentPath or None,
        )
        self.logic.load_model(choice)

    def onVolumeChanged(self, node):
        if node is None:
            return
        try:
            self.logic.set_volume(node)
        except Exception as e:
            self.ui.statusLabel.text = f"Cannot use {node.GetName()}: {e}"

    def onTool(self, kind):
        try:
            self.logic.set_tool(kind)
        except Exception as e:
            self.ui.statusLabel.text = str(e)
            self._showTool(None)

    def _toggle(self, kind):
        self.onTool(None if self.logic.tool == kind else kind)

    def _showTool(self, kind):
        for name, button in self._tools.items():
            button.blockSignals(True)
            button.checked = name == kind
            button.blockSignals(False)

    def _showSegments(self):
        combo = self.ui.segmentComboBox
        combo.blockSignals(True)
        combo.clear()
        segmentation = self.logic.segmentation.GetSegmentation()
        for segment_id in self.logic.segments:
            combo.addItem(segmentation.GetSegment(segment_id).GetName(), segment_id)
        if self.logic.current in self.logic.segments:
            combo.setCurrentIndex(list(self.logic.segments).index(self.logic.current))
        combo.blockSignals(False)

    def _showResult(self, segment_id):
        name = self.logic.segmentation.GetSegmentation().GetSegment(segment_id).GetName()
        self.ui.statusLabel.text = f"{name}: last click {self.logic.last_latency_ms:.0f} ms"

    def onSegmentSelected(self, index):
        self.logic.select_segment(self.ui.segmentComboBox.itemData(index))

    def onHistory(self, action):
        if self.logic.volume is None:
            return
        with slicer.util.RenderBlocker():
            getattr(self.logic, action)()

    def onNextSegment(self):
        try:
            self.logic.add_segment()
        except Exception as e:
            self.ui.statusLabel.text = str(e)

    def onExport(self):
        path = self.ui.exportPathLineEdit.currentPath
        if not path:
            self.ui.statusLabel.text = "Choose a file to export to."
            return
        try:
            self.logic.export(path)
        except Exception as e:
            self.ui.statusLabel.text = f"Export failed: {e}"

    def onDownload(self):
        name = self.ui.modelComboBox.currentText
        if name not in PUBLISHED_CHECKPOINTS:
            self.ui.statusLabel.text = "Select a published checkpoint in the Model list first."
            return
        if self._download is not None:
            return
        entry = PUBLISHED_CHECKPOINTS[name]
        if not slicer.util.confirmOkCancelDisplay(f"Download {name} from {entry['url']}?"):
            return
        path, state = self.logic.publishedPath(name), {}

        def progress(done, total):
            state["text"] = f"Downloading {name}: {done >> 20} of {total >> 20 if total else '?'} MB"

        def run():  # a thread of its own: the GUI stays responsive, the model thread stays free
            try:
                digest = dependencies.download(entry["url"], path, entry["sha256"], progress)
                state["text"] = f"Downloaded {os.path.basename(path)}, SHA256 {digest[:16]}..."
            except Exception as e:
                state["text"] = f"Download failed (nothing kept): {e}"

        thread = threading.Thread(target=run, daemon=True)
        self._download = (thread, state)
        thread.start()


class MemorizingSAMTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the scenarios of MemorizingSAMCore.selftest (which ``make test`` also runs on Slicer's
    core) on Slicer's sample data: clicks, a second segment, export, a transformed volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_click_second_segment_and_export()
        self.setUp()
        self.test_transformed_volume()

    def _logic(self):
        import SampleData

        volume = SampleData.SampleDataLogic().downloadMRHead()
        logic = SegmentationLogic(slicer.mrmlScene, slicer.app.applicationLogic())
        logic.load_model(ModelChoice())
        logic.wait()
        return logic, volume

    @staticmethod
    def _centre_ijk(volume):
        return [(n - 1) / 2 for n in volume.GetImageData().GetDimensions()]

    def test_click_second_segment_and_export(self):
        from MemorizingSAMCore import mrml

        logic, volume = self._logic()
        logic.set_volume(volume)
        centre = self._centre_ijk(volume)
        target = mrml.ijk_to_world(volume, [centre])[0]
        other = mrml.ijk_to_world(volume, [[centre[0] + 20, centre[1], centre[2]]])[0]
        path = os.path.join(slicer.app.temporaryPath, "memsam_test_labels.nrrd")
        selftest.check_click_second_segment_and_export(logic, target, other, path)
        logic.close()
        self.delayDisplay("click, second segment and export passed")

    def test_transformed_volume(self):
        logic, volume = self._logic()
        selftest.rotate_and_move(volume)
        logic.set_volume(volume)
        selftest.check_transformed_volume(logic, self._centre_ijk(volume))
        logic.close()
        self.delayDisplay("transformed volume passed")


if __name__ == "__main__":
    unittest.main()
