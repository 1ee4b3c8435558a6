"""Slicer's own core (the ``slicer-core`` wheel: MRML, Segmentations, Markups, Volumes logic, slicer/util.py) set
up the way the Slicer application sets it up, minus Qt: a scene, the application logic, and the module logics the
module and slicer.util use, registered under their module names.

Nothing here imitates Slicer: every object is Slicer's. Two names the application would provide are bound to the
real objects: ``slicer.mrmlScene`` (the scene) and ``slicer.modules.<name>.logic()`` (the real logic classes);
``slicer.app`` (Qt) does not exist, and the module's logic does not use it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import slicer


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
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
        markups=types.SimpleNamespace(logic=lambda: logics["Markups"]),
    )
    return SlicerCore(scene, app, logics["Volumes"], logics["Segmentations"], logics["Markups"])
