"""Slicer's own core (the ``slicer-core`` wheel: MRML, Segmentations, Markups, Volumes logic, slicer/util.py) set
up the way the Slicer application sets it up, minus Qt: a scene, the application logic, and the module logics the
module and slicer.util use, registered under their module names.

Nothing here imitates Slicer: every object is Slicer's. Two names the application would provide are bound to the
real objects by MemorizingSAMCore.standalone (the web app binds them the same way): ``slicer.mrmlScene`` (the
scene) and ``slicer.modules.<name>.logic()`` (the real logic classes);
``slicer.app`` (Qt) does not exist, and the module's logic does not use it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import slicer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MemorizingSAM"))
from MemorizingSAMCore import standalone  # noqa: E402


@dataclass
class SlicerCore:
    scene: object
    app_logic: object
    volumes: object
    segmentations: object
    markups: object

    def close(self) -> None:
        self.scene.Clear(1)


def start() -> SlicerCore:
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    # Labelmap display nodes look their colour table up in the Colors module logic.
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics = {}
    for name, cls in (
        ("Colors", slicer.vtkSlicerColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    standalone.bind(scene, app)
    return SlicerCore(scene, app, logics["Volumes"], logics["Segmentations"], logics["Markups"])
