"""Clicks through the Slicer module's logic on Slicer's own MRML (slicer-core) against the same clicks through
InteractiveSession.add_point, on the lung2 CT (pyradiomics 3.0.1, 512x512x61), for the shipped default model (with
its memory bank, as the module runs it) and the FastSAM3D architecture with the fixture-recipe weights.

A module click is timed from the markup event (a point placed through the markups display node, as Slicer's widget
places it) to the changed region written into the segmentation node, through the real model thread; in Slicer the
widget picks results up with a 5 ms timer, which this does not include. The library click is add_point alone.
Each of ``--repeats`` runs makes a new scene and session and places ``--clicks`` clicks (the first one encodes);
then the newest point is dragged (PointStart/EndInteraction around the moves) and that recompute is timed too.

    .venv/bin/python benchmarks/bench_slicer.py --json > benchmarks/results_slicer.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "Testing"), str(ROOT / "MemorizingSAM")]

import slicer  # noqa: E402
import slicer_core_app  # noqa: E402
from bench_session import click_points, interior_point  # noqa: E402
from common import emit, machine_info, recipe_model, setup_threads  # noqa: E402
from MemorizingSAMCore import markups, mrml, selftest  # noqa: E402
from MemorizingSAMCore.logic import SegmentationLogic  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model  # noqa: E402
from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.memory_bank import MemoryBank  # noqa: E402
from MemorizingSAMLib.resources import default_bank_path, default_model_path  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402


def p50(values) -> float:
    return round(statistics.median(values), 2)


def module_run(model, memory, image_path: Path, clicks) -> dict:
    """One scene: the clicks through the module's logic, then a drag of the newest point."""
    core = slicer_core_app.start()
    logic = SegmentationLogic(core.scene, core.app_logic)
    logic.use_session(lambda: InteractiveSession(model, memory=memory), "bench")
    volume = core.volumes.AddArchetypeVolume(str(image_path), "lung2")
    logic.set_volume(volume)
    seg = logic.add_segment()
    times, decodes = [], []
    for ijk, include in clicks:
        node = markups.prompt_nodes(core.scene, volume.GetID(), seg, "include" if include else "exclude")[-1]
        world = mrml.ijk_to_world(volume, [ijk])[0]
        t = time.perf_counter()
        selftest.place_point(node, world)
        logic.wait()
        times.append((time.perf_counter() - t) * 1e3)
        decodes.append(logic.last_decodes)
    last_kind = "include" if clicks[-1][1] else "exclude"
    node = markups.prompt_nodes(core.scene, volume.GetID(), seg, last_kind)[-1]
    index = node.GetNumberOfControlPoints() - 1
    t = time.perf_counter()
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    for step in range(1, 6):
        node.SetNthControlPointPositionWorld(index, *mrml.ijk_to_world(volume, [clicks[-1][0] + [step, 0, 0]])[0])
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    logic.wait()
    move = (time.perf_counter() - t) * 1e3
    move_decodes = logic.last_decodes
    logic.close()
    core.close()
    return {"times": times, "decodes": decodes, "move_ms": move, "move_decodes": move_decodes}


def library_run(model, memory, image: sitk.Image, clicks) -> list[float]:
    session = InteractiveSession(model, memory=memory)
    session.set_image(image)
    session.add_segment()
    times = []
    for ijk, include in clicks:
        t = time.perf_counter()
        session.add_point(ijk, include)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def run(args) -> dict:
    setup_threads()
    data = fetch_pyradiomics_data(ROOT / "data")
    image_path = data / "lung2_image.nrrd"
    image = sitk.ReadImage(str(image_path))
    p0 = interior_point(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd"))))
    clicks = [(p0, True)] + click_points(image, p0, args.clicks - 1)
    shipped = load_model(default_model_path()).prepare_for_inference()
    models = {
        "shipped_default": (shipped, MemoryBank.load(default_bank_path(), shipped)),
        "fastsam3d_recipe": (recipe_model("fastsam3d"), None),
    }
    out = {
        "machine": machine_info(),
        "image": "pyradiomics-3.0.1 data/lung2_image.nrrd (512x512x61, 0.63x0.63x5 mm)",
        "slicer_core": slicer.vtkMRMLScene().GetVersion() if hasattr(slicer.vtkMRMLScene(), "GetVersion") else "",
        "clicks": args.clicks,
        "repeats": args.repeats,
        "models": {},
    }
    for name, (model, memory) in models.items():
        module_runs, library_runs = [], []
        for _ in range(args.repeats):
            # Alternating, so that both paths meet the same phases of a drifting machine.
            module_runs.append(module_run(model, memory, image_path, clicks))
            library_runs.append(library_run(model, memory, image, clicks))
        by_n = [p50([r["times"][n] for r in module_runs]) for n in range(args.clicks)]
        lib_by_n = [p50([r[n] for r in library_runs]) for n in range(args.clicks)]
        refine = [t for r in module_runs for t in r["times"][1:]]
        lib_refine = [t for r in library_runs for t in r[1:]]
        out["models"][name] = {
            "module_click_ms_p50": p50(refine),
            "library_click_ms_p50": p50(lib_refine),
            "module_over_library": round(statistics.median(refine) / statistics.median(lib_refine), 3),
            "module_click_ms_by_n": by_n,
            "library_click_ms_by_n": lib_by_n,
            "click20_over_click2": round(by_n[-1] / by_n[1], 3),
            "first_click_ms_p50": by_n[0],
            "decodes_per_click": sorted({d for r in module_runs for d in r["decodes"]}),
            "move_point_ms_p50": p50([r["move_ms"] for r in module_runs]),
            "move_point_decodes": sorted({r["move_decodes"] for r in module_runs}),
        }
    out["machine_after"] = {"calibration_gemm_gflops": machine_info()["calibration_gemm_gflops"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
