"""The Slicer module below its Qt widgets, on Slicer's own core (the slicer-core wheel): a real scene, volumes
read by Slicer's reader or made by slicer.util, segmentation nodes with their layers, markups point lists and ROIs
placed through the markups display node the way Slicer's widget places them, firing their real events; the real
library and the shipped default model behind it. No fake: Testing/slicer_core_app.py only starts Slicer's core.

Each numbered test names the defect of the module it guards against (issue #17, items 1-14)."""

import ast
import http.server
import math
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="the module's tests need Slicer's core (pip install slicer-core)")

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "MemorizingSAM"
sys.path[:0] = [str(Path(__file__).parent), str(MODULE)]

import slicer  # noqa: E402
import slicer_core_app  # noqa: E402
from MemorizingSAMCore import dependencies, markups, mrml, selftest  # noqa: E402
from MemorizingSAMCore.logic import ModelChoice, SegmentationLogic  # noqa: E402

from MemorizingSAMLib.checkpoints import load_model  # noqa: E402
from MemorizingSAMLib.resources import DEFAULT_BANK_NAME, DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from MemorizingSAMLib.session import InteractiveSession  # noqa: E402

SAMPLES = ROOT / "Resources" / "SampleData"


# The shipped model's config name (its file is named after it).
DEFAULT_CONFIG = DEFAULT_MODEL_NAME.removesuffix(".pt")


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path()).prepare_for_inference()


@pytest.fixture
def core():
    c = slicer_core_app.start()
    yield c
    c.close()


@pytest.fixture
def logic(core, model):
    lg = SegmentationLogic(core.scene, core.app_logic)
    lg.use_session(lambda: InteractiveSession(model), "shipped default (test)")
    yield lg
    lg.close()


def rotation_z(deg):
    a = math.radians(deg)
    r = np.eye(4)
    r[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return r


def oblique_volume(core):
    """An oblique volume (IJK axes rotated 30 degrees about S, anisotropic voxels) under a parent transform
    (20 degrees and a shift), with two bright ellipsoids A (i=30) and B (i=65) at j=40, k=20."""
    shape = (40, 80, 90)  # [k, j, i]
    ijk_to_ras = rotation_z(30) @ np.diag([0.9, 0.8, 2.0, 1.0])
    ijk_to_ras[:3, 3] = [-30.0, 12.0, -40.0]
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    blob_a = ((i - 30) * 0.9) ** 2 / 100 + ((j - 40) * 0.8) ** 2 / 100 + ((k - 20) * 2.0) ** 2 / 144 <= 1
    blob_b = ((i - 65) * 0.9) ** 2 / 64 + ((j - 40) * 0.8) ** 2 / 64 + ((k - 20) * 2.0) ** 2 / 100 <= 1
    arr[blob_a] += 400
    arr[blob_b] += 250
    volume = slicer.util.addVolumeFromArray(arr, ijk_to_ras, "oblique")
    transform = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = rotation_z(20) @ np.array([[1, 0, 0, 5], [0, 1, 0, -8], [0, 0, 1, 3], [0, 0, 0, 1.0]])
    transform.SetMatrixTransformToParent(mrml._vtk_matrix(to_parent))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume, blob_a, blob_b, to_parent @ ijk_to_ras


def lung(core):
    """The shipped lung CT read by Slicer's own volume reader, and its lesion's centre (i, j, k)."""
    volume = core.volumes.AddArchetypeVolume(str(SAMPLES / "lung2_crop.nii.gz"), "lung2")
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "lung2_crop_label.nii.gz"))) > 0
    return volume, lesion, np.argwhere(lesion).mean(0)[::-1]


def world(volume, ijk):
    return mrml.ijk_to_world(volume, [ijk])[0]


def node_of(logic, kind, segment_id=None):
    return markups.prompt_nodes(logic.scene, logic.volume.GetID(), segment_id or logic.current, kind)[-1]


def session_mask(logic, segment_id):
    return logic.worker.call(lambda: logic.session.mask(logic.segments[segment_id].sid).copy())


def test_world_point_maps_to_its_voxel_through_parent_transform(core):
    volume, _, _, ijk_to_world = oblique_volume(core)
    ijk = np.array([12.5, 33.0, 7.25])
    np.testing.assert_allclose(mrml.world_to_ijk(volume, [(ijk_to_world @ [*ijk, 1])[:3]])[0], ijk, atol=1e-9)
    img = mrml.volume_to_sitk(volume)
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    np.testing.assert_allclose(lps * [-1, -1, 1], (mrml.ijk_to_ras(volume) @ [*ijk, 1])[:3], atol=1e-9)


def test_1_first_click_of_a_new_segment_is_written(core, logic):
    """A new segment's internal labelmap is empty in Slicer (shape (0, 0, 0)); the first write allocates it."""
    volume, blob_a, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    assert slicer.util.arrayFromSegmentInternalBinaryLabelmap(logic.segmentation, seg).size == 0
    selftest.click(logic, world(volume, (30, 40, 20)))
    mask = mrml.segment_array(logic.segmentation, seg, volume)
    assert mask[20, 40, 30] == 1 and np.array_equal(mask, session_mask(logic, seg))
    assert logic.last_decodes == 1


def test_2_segments_never_erase_each_other(core, logic):
    """AddEmptySegment puts a new segment into the first one's shared layer; each segment gets its own."""
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    a = logic.add_segment()
    selftest.click(logic, world(volume, (30, 40, 20)))
    first = mrml.segment_array(logic.segmentation, a, volume)
    b = logic.add_segment()
    selftest.click(logic, world(volume, (31, 41, 20)))  # the same structure: the masks overlap
    second = mrml.segment_array(logic.segmentation, b, volume)
    assert (first & second).sum() > 0.5 * first.sum()
    assert np.array_equal(mrml.segment_array(logic.segmentation, a, volume), first)
    segmentation = logic.segmentation.GetSegmentation()
    assert segmentation.GetLayerIndex(a) != segmentation.GetLayerIndex(b)
    # A segment moved into a shared layer by someone else (Segment Editor collapses layers) is separated again.
    # (Forced into one layer, overlapping voxels keep one label: what a holds after that is what must stay.)
    segmentation.CollapseBinaryLabelmaps(True)
    assert segmentation.GetLayerIndex(a) == segmentation.GetLayerIndex(b)
    collapsed = mrml.segment_array(logic.segmentation, a, volume)
    selftest.click(logic, world(volume, (33, 42, 21)), segment_id=b)
    assert segmentation.GetLayerIndex(a) != segmentation.GetLayerIndex(b)
    assert np.array_equal(mrml.segment_array(logic.segmentation, a, volume), collapsed)
    assert np.array_equal(mrml.segment_array(logic.segmentation, b, volume), session_mask(logic, b))


def test_3_the_extension_installs_the_model_and_bank_where_the_library_looks(tmp_path):
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for name in (DEFAULT_MODEL_NAME, DEFAULT_BANK_NAME):
        assert f"Resources/models/{name}" in cmake, f"{name} is not installed by MemorizingSAM/CMakeLists.txt"
    # The install puts MemorizingSAMLib/ and Resources/models/ side by side in Slicer's scripted-modules folder.
    install = re.search(r"install\(FILES \$\{MEMSAM_MODEL_FILES\}\s+DESTINATION (\S+)", cmake)
    assert install and install.group(1) == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources/models"
    lib = tmp_path / "qt-scripted-modules"
    (lib / "MemorizingSAMLib").mkdir(parents=True)
    (lib / "Resources" / "models").mkdir(parents=True)
    (lib / "MemorizingSAMLib" / "resources.py").write_text((ROOT / "MemorizingSAMLib" / "resources.py").read_text())
    (lib / "MemorizingSAMLib" / "__init__.py").write_text("")
    for name in (DEFAULT_MODEL_NAME, DEFAULT_BANK_NAME):
        (lib / "Resources" / "models" / name).write_bytes(b"x")
    code = (
        "from MemorizingSAMLib import resources; print(resources.default_model_path(), resources.default_bank_path())"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=lib, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        str(lib / "Resources" / "models" / n) for n in (DEFAULT_MODEL_NAME, DEFAULT_BANK_NAME)
    ]


def test_4_the_module_folder_holds_one_module_and_starts_without_torch():
    """Slicer loads every top-level .py of a module's folder as a module; the helpers live in a package, and
    neither MemorizingSAM.py's imports nor the package import torch or the library at start-up."""
    assert sorted(p.name for p in MODULE.glob("*.py")) == ["MemorizingSAM.py"]
    tree = ast.parse((MODULE / "MemorizingSAM.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n and (n.startswith("torch") or n.startswith("MemorizingSAMLib"))}, names
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]\n"
        "import MemorizingSAMCore.logic, MemorizingSAMCore.dependencies, MemorizingSAMCore.selftest\n"
        "print(sorted(m for m in ('torch', 'MemorizingSAMLib.session') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for f in MODULE.rglob("*.py"):
        assert f.relative_to(MODULE).as_posix() in cmake, f"{f} is not listed in MemorizingSAM/CMakeLists.txt"
    for f in (ROOT / "MemorizingSAMLib").rglob("*.py"):
        assert f.relative_to(ROOT).as_posix() in cmake, f"{f} is not listed in MemorizingSAM/CMakeLists.txt"


def test_5_undo_redo_reset_move_the_points_and_the_saved_prompts(core, logic):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    include, exclude = node_of(logic, "include"), node_of(logic, "exclude")
    selftest.click(logic, world(volume, (30, 40, 20)))
    one = mrml.segment_array(logic.segmentation, seg, volume)
    selftest.click(logic, world(volume, (36, 44, 21)), include=False)
    two = mrml.segment_array(logic.segmentation, seg, volume)

    def saved():
        logic.scene.InvokeEvent(slicer.vtkMRMLScene.StartSaveEvent)  # what Slicer fires when the scene is saved
        return [r["kind"] for r in mrml.load_prompts(logic.segmentation)[seg]]

    assert (include.GetNumberOfControlPoints(), exclude.GetNumberOfControlPoints()) == (1, 1)
    logic.undo()
    assert (include.GetNumberOfControlPoints(), exclude.GetNumberOfControlPoints()) == (1, 0)
    assert np.array_equal(mrml.segment_array(logic.segmentation, seg, volume), one) and saved() == ["include"]
    # The next click must not bring the undone point back.
    selftest.click(logic, world(volume, (28, 38, 20)))
    assert [p.include for p in logic.session.placed(logic.segments[seg].sid)] == [True, True]
    logic.undo()
    logic.redo()
    assert include.GetNumberOfControlPoints() == 2 and exclude.GetNumberOfControlPoints() == 0
    logic.undo()
    logic.undo()
    assert include.GetNumberOfControlPoints() == 0 and mrml.segment_array(logic.segmentation, seg, volume).sum() == 0
    logic.redo()
    logic.reset()
    assert include.GetNumberOfControlPoints() == 0 and saved() == []
    assert mrml.segment_array(logic.segmentation, seg, volume).sum() == 0
    selftest.click(logic, world(volume, (30, 40, 20)))  # a reset segment starts over: one prompt, not the old ones
    assert len(logic.session.placed(logic.segments[seg].sid)) == 1
    assert np.array_equal(mrml.segment_array(logic.segmentation, seg, volume), one)
    del two


def test_6_hover_and_the_first_box_click_recompute_nothing(core, logic):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    selftest.click(logic, world(volume, (30, 40, 20)))
    jobs, steps = logic.worker.submitted, len(logic.session.segments[logic.segments[seg].sid].undo)
    selftest.hover_then_leave(node_of(logic, "include"), world(volume, (50, 40, 20)))
    logic.wait()
    assert logic.worker.submitted == jobs
    logic.set_tool("box")
    roi = node_of(logic, "box")
    selftest.place_point(roi, world(volume, (20, 30, 15)))  # first of the box's two clicks: size zero
    logic.wait()
    assert logic.worker.submitted == jobs
    selftest.place_point(roi, world(volume, (40, 50, 25)))
    logic.wait()
    assert logic.worker.submitted == jobs + 1 and logic.last_decodes == 1
    assert len(logic.session.segments[logic.segments[seg].sid].undo) == steps + 1


def test_7_a_box_on_an_oblique_volume_spans_all_its_corners(core):
    """A 20 mm world box on a volume rotated 30 degrees: the voxel box must hold all eight corners (two corners
    alone give a box that clips the mask)."""
    volume, _, _, ijk_to_world = oblique_volume(core)
    roi = core.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre = world(volume, (45, 40, 20))
    roi.SetAndObserveObjectToNodeMatrix(
        mrml._vtk_matrix(np.array([[1, 0, 0, centre[0]], [0, 1, 0, centre[1]], [0, 0, 1, centre[2]], [0, 0, 0, 1.0]]))
    )
    roi.SetSize(20, 20, 20)
    lo, hi = mrml.roi_box_ijk(roi, volume)
    corners = np.array([[x, y, z] for x in (-10, 10) for y in (-10, 10) for z in (-10, 10)]) + centre
    ijk = mrml.world_to_ijk(volume, corners)
    assert np.all(ijk >= lo - 1e-4) and np.all(ijk <= hi + 1e-4)  # (ROI geometry is single precision)
    two = mrml.world_to_ijk(volume, corners[[0, -1]])  # what the module used to map: two opposite corners
    assert (hi - lo)[1] > 10 * abs(two[1, 1] - two[0, 1]) and (hi - lo)[1] > 35


def test_8_a_second_box_placed_with_persistence_is_the_segments_box(core, logic):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    logic.set_tool("box")
    core.app_logic.GetInteractionNode().SetPlaceModePersistence(1)
    selftest.place_box(node_of(logic, "box"), world(volume, (20, 30, 15)), world(volume, (40, 50, 25)))
    logic.wait()
    (first,) = logic.session.placed(logic.segments[seg].sid)
    # What Slicer does next in persistent place mode: the ROI is full, so a new ROI node becomes the place node.
    new_roi = core.markups.AddNewMarkupsNode("vtkMRMLMarkupsROINode")
    core.app_logic.GetSelectionNode().SetActivePlaceNodeID(new_roi.GetID())
    assert logic.tool == "box" and markups.owner(new_roi).segment_id == seg
    selftest.place_box(new_roi, world(volume, (55, 30, 15)), world(volume, (75, 50, 25)))
    logic.wait()
    (box,) = logic.session.placed(logic.segments[seg].sid)
    assert box.is_box and box.tag != first.tag and box.ijk[0] > 50
    assert len(markups.prompt_nodes(core.scene, volume.GetID(), seg, "box")) == 1  # the old box is gone
    mask = mrml.segment_array(logic.segmentation, seg, volume)
    assert mask[:, :, :45].sum() == 0 and mask[20, 40, 65] == 1


def test_9_mrml_stays_on_the_gui_thread_and_history_waits_for_running_clicks(core, logic, monkeypatch):
    threads = set()
    to_ijk = mrml.world_to_ijk

    def spy(*args):
        threads.add(threading.current_thread().name)
        return to_ijk(*args)

    monkeypatch.setattr(mrml, "world_to_ijk", spy)
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    # Two clicks, each read at the GUI's next event-loop turn (flush), without waiting for the model.
    selftest.place_point(node_of(logic, "include"), world(volume, (30, 40, 20)))
    logic.flush()
    selftest.place_point(node_of(logic, "include"), world(volume, (34, 40, 20)))
    logic.flush()
    assert logic.worker.busy
    logic.undo()  # waits for both clicks, then undoes the second
    assert threads == {threading.main_thread().name}
    assert node_of(logic, "include").GetNumberOfControlPoints() == 1
    assert len(logic.session.placed(logic.segments[seg].sid)) == 1
    assert np.array_equal(mrml.segment_array(logic.segmentation, seg, volume), session_mask(logic, seg))


def test_9_the_model_loads_on_the_worker_thread(core):
    lg = SegmentationLogic(core.scene, core.app_logic)
    try:
        future = lg.load_model(ModelChoice(use_memory=False))
        assert not future.done()  # the GUI thread goes on while the model loads
        lg.wait()
        assert DEFAULT_CONFIG in lg.model_description and lg.loaded_on.startswith("MemorizingSAM")
    finally:
        lg.close()


def test_10_points_go_to_the_segment_of_their_node_and_prompts_are_per_volume(core, logic):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    a = logic.add_segment()
    b = logic.add_segment()  # "next segment": b is current
    selftest.place_point(node_of(logic, "include", a), world(volume, (30, 40, 20)))  # ... but the user clicks a's list
    logic.wait()
    assert len(logic.session.placed(logic.segments[a].sid)) == 1 and not logic.session.placed(logic.segments[b].sid)
    # A point outside the volume is ignored with a message; the next update still works.
    selftest.click(logic, world(volume, (200, 40, 20)), segment_id=b)
    assert "outside the volume" in logic.status and not logic.session.placed(logic.segments[b].sid)
    selftest.click(logic, world(volume, (65, 40, 20)), segment_id=b)
    assert len(logic.session.placed(logic.segments[b].sid)) == 1
    assert mrml.segment_array(logic.segmentation, b, volume)[20, 40, 65] == 1
    # Another volume: its own segmentation and prompt nodes, none of the first volume's points.
    other, _, _ = lung(core)
    logic.set_volume(other)
    c = logic.add_segment()
    assert node_of(logic, "include", c).GetNumberOfControlPoints() == 0
    assert logic.segmentation.GetAttribute("MemorizingSAM.Volume") == other.GetID()
    # ... and going back resumes the first volume's segments with their prompts.
    logic.set_volume(volume)
    assert set(logic.segments) == {a, b} and len(logic.session.placed(logic.segments[b].sid)) == 1
    assert np.array_equal(mrml.segment_array(logic.segmentation, b, volume), session_mask(logic, b))


def test_11_shortcuts_live_only_while_the_module_is_shown():
    """Widget code (Qt, which cannot run here): shortcuts are made in enter() and deleted in exit(), on keys that
    neither Segment Editor (Ctrl+Z, Ctrl+Y, z, y) nor the slice views (b, f, ...) use."""
    source = (MODULE / "MemorizingSAM.py").read_text()
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MemorizingSAMWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "QShortcut" not in methods["setup"] and "installShortcuts" in methods["enter"]
    assert "removeShortcuts" in methods["exit"] and "removeShortcuts" in methods["cleanup"]
    keys = [k for k in re.findall(r"'([^']+)'", methods["installShortcuts"]) if k != "activated()"]
    taken = {"ctrl+z", "ctrl+y", "z", "y", "b", "f", "r", "v", "g", "t", "s"}
    assert keys and not {k.lower() for k in keys} & taken, keys


def test_12_one_tool_at_a_time_following_the_interaction_mode(core, logic):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seen = []
    logic.on_tool = seen.append
    logic.set_tool("include")
    interaction, selection = core.app_logic.GetInteractionNode(), core.app_logic.GetSelectionNode()
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert selection.GetActivePlaceNodeID() == node_of(logic, "include").GetID()
    logic.set_tool("exclude")
    assert logic.tool == "exclude" and selection.GetActivePlaceNodeID() == node_of(logic, "exclude").GetID()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)  # the user leaves place mode in Slicer
    assert logic.tool is None and seen == ["include", "exclude", None]
    logic.set_tool("include")
    other = core.markups.AddNewMarkupsNode("vtkMRMLMarkupsFiducialNode")
    selection.SetActivePlaceNodeID(other.GetID())  # the user picks another point list in the toolbar
    assert logic.tool is None


def test_13_torch_version_is_checked():
    assert dependencies.torch_problem("2.1.2+cu118") and "2.4" in dependencies.torch_problem("2.1.2+cu118")
    assert dependencies.torch_problem("2.13.0") is None and dependencies.torch_problem() is None


@pytest.fixture
def file_server(tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            body = payload[: len(payload) // 3] if self.path == "/broken" else payload
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payload
    server.shutdown()


def test_13_downloads_are_complete_and_verified_or_absent(file_server, tmp_path):
    url, payload = file_server
    target = tmp_path / "ckpt.pth"
    with pytest.raises(dependencies.DownloadError, match="stopped at 100000 of 300000"):
        dependencies.download(url + "/broken", str(target))
    assert not target.exists() and not (tmp_path / "ckpt.pth.part").exists()
    seen = []
    digest = dependencies.download(url + "/ok", str(target), progress=lambda n, total: seen.append((n, total)))
    assert target.read_bytes() == payload and seen[-1] == (300_000, 300_000)
    with pytest.raises(dependencies.DownloadError, match="does not match"):
        dependencies.download(url + "/ok", str(tmp_path / "other.pth"), sha256="0" * 64)
    assert not (tmp_path / "other.pth").exists()
    assert dependencies.download(url + "/broken", str(target), sha256=digest) == digest  # complete file reused


def test_14_default_model_brings_its_bank_and_labelmaps_are_refused(core):
    lg = SegmentationLogic(core.scene, core.app_logic)
    try:
        lg.load_model(ModelChoice())
        lg.wait()
        assert DEFAULT_BANK_NAME in lg.model_description
        labelmap = core.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        with pytest.raises(mrml.VolumeError, match="labelmap"):
            lg.set_volume(labelmap)
    finally:
        lg.close()
    ui = ET.parse(MODULE / "Resources" / "UI" / "MemorizingSAM.ui")
    selector = next(w for w in ui.iter("widget") if w.get("name") == "volumeSelector")
    hidden = [
        s.text for p in selector.iter("property") if p.get("name") == "hideChildNodeTypes" for s in p.iter("string")
    ]
    assert hidden == ["vtkMRMLLabelMapVolumeNode"]
    source = (MODULE / "MemorizingSAM.py").read_text()
    assert "DEFAULT_MODEL_NAME" in source and "memsam_tiny_student" not in source


def test_one_decode_per_click_in_placement_order_and_a_moved_point_costs_one(core, logic):
    volume, lesion, centre = lung(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    rng = np.random.default_rng(3)
    for n in range(6):
        ijk = centre + rng.normal(0, 3, 3) * [1, 1, 0.3]
        selftest.click(logic, world(volume, ijk), include=n % 2 == 0)
        assert logic.last_decodes == 1
    placed = logic.session.placed(logic.segments[seg].sid)
    assert [p.include for p in placed] == [True, False, True, False, True, False]
    # Drag the newest point: PointModified events while dragging, one recompute at the end, one decode. The
    # GUI's timer (logic.schedule) fires between the moves, as Slicer's zero-delay timer does.
    node = node_of(logic, "exclude")
    jobs = logic.worker.submitted
    timer: list = []
    logic.schedule = timer.append
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    for step in range(5):
        node.SetNthControlPointPositionWorld(2, *world(volume, centre + [8 + step, 0, 0]))
        while timer:
            timer.pop(0)()
        assert logic.worker.submitted == jobs, "no recompute while the point is being dragged"
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    while timer:
        timer.pop(0)()
    logic.schedule = None
    logic.wait()
    assert logic.worker.submitted == jobs + 1 and logic.last_decodes == 1
    assert logic.session.placed(logic.segments[seg].sid)[-1].ijk[0] > centre[0] + 11
    # Delete the first point: the chain replays from there (five decodes).
    node_of(logic, "include").RemoveNthControlPoint(0)
    logic.wait()
    assert logic.last_decodes == 5
    fresh = logic.add_segment()
    sid = logic.segments[fresh].sid
    logic.worker.call(lambda: logic.session.set_prompts(list(logic.session.placed(logic.segments[seg].sid)), sid))
    assert np.array_equal(mrml.segment_array(logic.segmentation, seg, volume), session_mask(logic, fresh))


def test_self_test_scenarios_run_on_slicer_core(core, logic, tmp_path):
    """The logic part of MemorizingSAMTest (the in-Slicer self-test), on the shipped lung CT."""
    volume, lesion, centre = lung(core)
    logic.set_volume(volume)
    selftest.check_click_second_segment_and_export(
        logic, world(volume, centre), world(volume, centre + [25, 0, 0]), str(tmp_path / "labels.nrrd")
    )
    selftest.rotate_and_move(volume)
    logic.set_volume(volume)
    selftest.check_transformed_volume(logic, centre)


def test_export_is_atomic_and_on_the_volume_grid(core, logic, tmp_path):
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    seg = logic.add_segment()
    selftest.click(logic, world(volume, (30, 40, 20)))
    path = tmp_path / "labels.nii.gz"
    logic.export(str(path))
    back = sitk.ReadImage(str(path))
    ref = mrml.volume_to_sitk(volume)
    assert back.GetSize() == ref.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back) > 0, session_mask(logic, seg) > 0)
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="export to"):
        logic.export(str(tmp_path / "labels.png"))
    with pytest.raises(FileNotFoundError):
        logic.export(str(tmp_path / "missing" / "labels.nii.gz"))
    assert path.read_bytes() == b"keep me"
    seg_file = tmp_path / "all.seg.nrrd"
    logic.export(str(seg_file))
    assert seg_file.stat().st_size > 0


def test_widget_uses_only_widgets_the_ui_file_has():
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "MemorizingSAM.py").read_text()))
    ui = ET.parse(MODULE / "Resources" / "UI" / "MemorizingSAM.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    assert used and used <= names, used - names


class SettingsStore(dict):
    """Stands in for qt.QSettings, which needs Qt (not on these machines): the two calls the module makes."""

    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):  # noqa: N802 (Qt's name)
        self[key] = value


def test_remote_mode_sends_the_users_token_and_keeps_it_out_of_the_scene(core, tmp_path):
    """Remote mode against a real `memsam serve` with a users file: URL and token from the settings reach the
    server, a click is written into the segment, the saved scene holds no token; a wrong token, a server that is
    not there and a saturated one are each said in words a user can act on."""
    from MemorizingSAMCore import remote

    from MemorizingSAMLib.client import RemoteError, RemoteSession
    from MemorizingSAMLib.server_process import ServerProcess, free_port
    from MemorizingSAMLib.users import add_user

    token = add_user(tmp_path / "users.txt", "alice")
    with ServerProcess(["--model", default_model_path(), "--users-file", tmp_path / "users.txt"]) as server:
        store = SettingsStore()
        remote.save_settings(store, remote.RemoteSettings(server.url, token))
        settings = remote.load_settings(store)
        assert settings == remote.RemoteSettings(server.url, token) and settings.enabled
        ok, text = remote.check_connection(settings)
        assert ok and DEFAULT_CONFIG in text

        lg = SegmentationLogic(core.scene, core.app_logic)
        try:
            lg.load_model(ModelChoice(server_url=settings.url, token=settings.token)).result()
            lg.wait()
            assert lg.model_description == f"remote {server.url}"
            volume, _, _, _ = oblique_volume(core)
            lg.set_volume(volume)
            seg = lg.add_segment()
            selftest.click(lg, world(volume, (30, 40, 20)))
            lg.wait()
            mask = mrml.segment_array(lg.segmentation, seg, volume)
            assert mask[20, 40, 30] == 1 and np.array_equal(mask, session_mask(lg, seg))
            assert RemoteSession(server.url, token).info()["sessions"] == 1
            core.scene.SetURL(str(tmp_path / "scene.mrml"))
            core.scene.Commit()
            saved = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.mrml"))
            assert saved and token not in saved
        finally:
            lg.close()

        ok, text = remote.check_connection(remote.RemoteSettings(server.url, "not-the-token"))
        assert not ok and "refused the token (401)" in text
        lg = SegmentationLogic(core.scene, core.app_logic)
        try:
            with pytest.raises(ConnectionError, match="401"):
                lg.load_model(ModelChoice(server_url=server.url, token="wrong")).result()
        finally:
            lg.close()
    ok, text = remote.check_connection(remote.RemoteSettings(f"http://127.0.0.1:{free_port()}", token))
    assert not ok and text.startswith("cannot reach")
    busy = remote.explain(RemoteError(503, "the server is saturated", retry_after=3), "http://gpu:8765")
    assert "saturated" in busy and "Try again in 3 s" in busy


def test_segments_are_deleted_renamed_and_recoloured_with_their_prompts(core, logic):
    """What the web app's segment list (and any front end) does through the logic: deleting a segment takes its
    voxels, its prompt markups and its session segment; the next click goes to the segment made current; names and
    colours reach the segment and its markups."""
    volume, _, _, _ = oblique_volume(core)
    logic.set_volume(volume)
    a = logic.add_segment()
    selftest.click(logic, world(volume, (30, 40, 20)))
    b = logic.add_segment()
    selftest.click(logic, world(volume, (31, 41, 20)))
    kept = mrml.segment_array(logic.segmentation, a, volume)
    sid_b = logic.segments[b].sid
    b_nodes = [n.GetID() for k in markups.KINDS for n in markups.prompt_nodes(core.scene, volume.GetID(), b, k)]
    assert b_nodes
    logic.remove_segment(b)
    assert logic.segmentation.GetSegmentation().GetSegment(b) is None
    assert all(core.scene.GetNodeByID(i) is None for i in b_nodes)
    with pytest.raises(ValueError, match=f"no segment {sid_b}"):  # PromptError
        logic.worker.call(lambda: logic.session.mask(sid_b))
    assert logic.current == a and [s["id"] for s in logic.segment_list()] == [a]
    assert np.array_equal(mrml.segment_array(logic.segmentation, a, volume), kept)
    assert b not in mrml.load_prompts(logic.segmentation)
    # A new segment takes the free number, not a name already in use.
    c = logic.add_segment()
    assert logic.segmentation.GetSegmentation().GetSegment(c).GetName() == "Segment_2"

    logic.rename_segment(a, "  lesion ")
    assert logic.segmentation.GetSegmentation().GetSegment(a).GetName() == "lesion"
    assert node_of(logic, "include", a).GetName().startswith("lesion include")
    with pytest.raises(ValueError, match="needs a name"):
        logic.rename_segment(a, " ")
    logic.set_segment_colour(a, (0.2, 0.6, 0.9))
    np.testing.assert_allclose(logic.segmentation.GetSegmentation().GetSegment(a).GetColor(), (0.2, 0.6, 0.9))
    with pytest.raises(ValueError, match="three values in 0..1"):
        logic.set_segment_colour(a, (1.2, 0, 0))
    with pytest.raises(KeyError):
        logic.remove_segment("no-such-segment")
