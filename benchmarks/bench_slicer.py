"""Clicks through the Slicer module's logic on Slicer's own MRML (slicer-core) against the same clicks through
InteractiveSession.add_point, on the lung2 CT (pyradiomics 3.0.1, 512x512x61), for the shipped default model (with
its memory bank, as the module runs it) and the FastSAM3D architecture with the fixture-recipe weights.

A module click is timed from the markup event (a point placed through the markups display node, as Slicer's widget
places it) to the changed region written into the segmentation node, through the real model thread; in Slicer the
widget picks results up with a 5 ms timer, which this does not include. The library click is add_point alone, run
on the same model thread: all torch work of this process runs on that one thread, as in Slicer (a second thread
running torch makes a second OpenMP team, and with more OpenMP threads than cores libgomp stops spinning between
kernels, which costs a decode here 2-4 ms).
Each of ``--repeats`` runs makes a new scene and two sessions and places ``--clicks`` clicks (the first one encodes),
each through the module and then through add_point, so that both meet the same phase of this drifting machine;
then the newest point is dragged (PointStart/EndInteraction around the moves) and that recompute is timed too.

    .venv/bin/python benchmarks/bench_slicer.py --json > benchmarks/results_slicer.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "Testing"), str(ROOT / "MemorizingSAM")]

import slicer  # noqa: E402
import slicer_core_app  # noqa: E402
from bench_session import click_points, interior_point  # noqa: E402
from common import emit, machine_info, recipe_model, setup_threads  # noqa: E402
from MemorizingSAMCore import markups, mrml, selftest  # noqa: E402
from MemorizingSAMCore.logic import SegmentationLogic  # noqa: E402
from MemorizingSAMCore.worker import ModelWorker  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model  # noqa: E402
from MemorizingSAMLib.datasets import fetch_pyradiomics_data  # noqa: E402
from MemorizingSAMLib.memory_bank import MemoryBank  # noqa: E402
from MemorizingSAMLib.resources import default_bank_path, default_model_path  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402


def p50(values) -> float:
    return round(statistics.median(values), 2)


def paired_run(worker: ModelWorker, model, memory, image_path: Path, image: sitk.Image, clicks) -> dict:
    """One scene and one library session side by side: each click through the module, then the same click through
    add_point (both meet the same phase of a drifting machine); then a drag of the module's newest point."""
    core = slicer_core_app.start()
    logic = SegmentationLogic(core.scene, core.app_logic, worker)
    logic.use_session(lambda: InteractiveSession(model, memory=memory), "bench")
    volume = core.volumes.AddArchetypeVolume(str(image_path), "lung2")
    logic.set_volume(volume)
    seg = logic.add_segment()

    def new_session():
        session = InteractiveSession(model, memory=memory)
        session.set_image(image)
        session.add_segment()
        return session

    library = worker.call(new_session)

    def library_click(ijk, include):
        t = time.perf_counter()
        library.add_point(ijk, include)
        return (time.perf_counter() - t) * 1e3

    module_ms, library_ms, decodes = [], [], []
    for ijk, include in clicks:
        node = markups.prompt_nodes(core.scene, volume.GetID(), seg, "include" if include else "exclude")[-1]
        world = mrml.ijk_to_world(volume, [ijk])[0]
        t = time.perf_counter()
        selftest.place_point(node, world)
        logic.wait()
        module_ms.append((time.perf_counter() - t) * 1e3)
        decodes.append(logic.last_decodes)
        library_ms.append(worker.call(lambda: library_click(ijk, include)))  # noqa: B023 (called at once)
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
    out = {"module": module_ms, "library": library_ms, "decodes": decodes}
    out.update({"move_ms": move, "move_decodes": logic.last_decodes})
    logic.close()
    core.close()
    return out


def run(args) -> dict:
    worker = ModelWorker()
    worker.call(setup_threads)
    data = fetch_pyradiomics_data(ROOT / "data")
    image_path = data / "lung2_image.nrrd"
    image = sitk.ReadImage(str(image_path))
    p0 = interior_point(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "lung2_label.nrrd"))))
    clicks = [(p0, True)] + click_points(image, p0, args.clicks - 1)
    shipped = worker.call(lambda: load_model(default_model_path()).prepare_for_inference())
    models = {
        "shipped_default": (shipped, worker.call(lambda: MemoryBank.load(default_bank_path(), shipped))),
        "fastsam3d_recipe": (worker.call(lambda: recipe_model("fastsam3d")), None),
    }
    out = {
        "machine": worker.call(machine_info),
        "image": "pyradiomics-3.0.1 data/lung2_image.nrrd (512x512x61, 0.63x0.63x5 mm)",
        "slicer_core": importlib.metadata.version("slicer-core"),
        "clicks": args.clicks,
        "repeats": args.repeats,
        "models": {},
    }
    for name, (model, memory) in models.items():
        runs = [paired_run(worker, model, memory, image_path, image, clicks) for _ in range(args.repeats)]
        by_n = [p50([r["module"][n] for r in runs]) for n in range(args.clicks)]
        lib_by_n = [p50([r["library"][n] for r in runs]) for n in range(args.clicks)]
        refine = [t for r in runs for t in r["module"][1:]]
        lib_refine = [t for r in runs for t in r["library"][1:]]
        out["models"][name] = {
            "module_click_ms_p50": p50(refine),
            "library_click_ms_p50": p50(lib_refine),
            "module_over_library": round(statistics.median(refine) / statistics.median(lib_refine), 3),
            "module_click_ms_by_n": by_n,
            "library_click_ms_by_n": lib_by_n,
            "click20_over_click2": round(by_n[-1] / by_n[1], 3),
            "first_click_ms_p50": by_n[0],
            "decodes_per_click": sorted({d for r in runs for d in r["decodes"]}),
            "move_point_ms_p50": p50([r["move_ms"] for r in runs]),
            "move_point_decodes": sorted({r["move_decodes"] for r in runs}),
        }
    out["machine_after"] = {"calibration_gemm_gflops": worker.call(machine_info)["calibration_gemm_gflops"]}
    worker.shutdown()
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
