"""Slicer's core outside the Slicer application (the slicer-core wheel: the web app on trame-slicer, the tests).

``slicer.util`` reaches the scene as ``slicer.mrmlScene`` and module logics as ``slicer.modules.<name>.logic()``,
names the Slicer application binds at start-up. :func:`bind` binds them to a scene and to the module logics an
application logic has registered (``vtkSlicerApplicationLogic.SetModuleLogic``), so that the module's code runs
unchanged. Nothing is imitated: both names point at Slicer's own objects. Inside Slicer this is never called.
"""

from __future__ import annotations

import types

import slicer

# The module logics slicer.util and this module use, by their registered names.
MODULE_LOGICS = ("Colors", "Volumes", "Segmentations", "Markups", "VolumeRendering")


def bind(scene, app_logic) -> list[str]:
    """Bind ``slicer.mrmlScene`` to ``scene`` and ``slicer.modules.<name>.logic()`` to the registered module
    logics; returns the module names bound. Refuses inside the Slicer application, whose names are its own."""
    if hasattr(slicer, "app"):
        raise RuntimeError("inside the Slicer application: slicer.mrmlScene and slicer.modules are Slicer's own")
    modules = {}
    for name in MODULE_LOGICS:
        logic = app_logic.GetModuleLogic(name)
        if logic is not None:
            modules[name.lower()] = types.SimpleNamespace(logic=lambda logic=logic: logic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)
    return sorted(modules)
