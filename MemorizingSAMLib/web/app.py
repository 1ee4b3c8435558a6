"""``memsam web``: the Slicer module's tool as a web page, on Slicer's core (trame-slicer).

Below the page everything is the Slicer module's: MemorizingSAMCore's SegmentationLogic observes the markups that
Slicer's own markups widget places when the user clicks in a slice view (the browser's mouse events go to the
view's VTK interactor through trame's remote-controlled area), sends the prompts to the session (one decode per
click), and writes the changed box into the segment's labelmap; Slicer's displayable managers draw it and the
views stream the frames back. This file only lays out the page and forwards its buttons to that logic.

Threads: trame's asyncio loop is the GUI thread (MRML is touched only there); the model runs on the logic's
worker thread, which wakes the loop when a job finishes (no polling).

One process serves one scene: every browser tab on it sees the same volume and segments (trame's launcher, or
one process per user behind a proxy, serves several users; clicks may then share one ``memsam serve``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from .config import (
    EXPORT_FORMATS,
    Volume,
    WebConfig,
    data_files,
    export_name,
    is_volume_file,
    safe_upload_name,
    samples,
)

log = logging.getLogger(__name__)

# Colours the page offers beyond the module's own (MemorizingSAMCore.logic.PALETTE, 0..1 RGB).
EXTRA_COLOURS = ((0.9, 0.2, 0.3), (0.6, 0.4, 0.2))


def button(label: str, element_id: str, click, **kwargs):
    """A small button with an id (what the browser tests, and scripts driving the page, find it by)."""
    from trame_vuetify.widgets import vuetify3 as v3

    return v3.VBtn(label, click=click, size="small", id=element_id, **{"classes": "ml-1", **kwargs})


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(float(c) * 255):02x}" for c in rgb)


def _module_core_path() -> None:
    """In a source checkout MemorizingSAMCore lives in the Slicer module's folder; an installed wheel has it as a
    package of its own (pyproject.toml)."""
    import sys

    try:
        import MemorizingSAMCore  # noqa: F401
    except ImportError:
        here = Path(__file__).resolve().parents[2] / "MemorizingSAM"
        if (here / "MemorizingSAMCore").is_dir():
            sys.path.insert(0, str(here))


class WebApp:
    """The page, the Slicer core behind it and the module's logic. ``server``: a trame server (a new one if
    None). Construct, then ``server.start(...)``; :func:`main` does both."""

    def __init__(self, config: WebConfig, server=None) -> None:
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # off-screen, no display needed
        _module_core_path()
        from MemorizingSAMCore import markups, standalone
        from MemorizingSAMCore.logic import PALETTE, ModelChoice, SegmentationLogic
        from MemorizingSAMCore.worker import ModelWorker
        from trame.app import get_server
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from ..resources import sample_data_dir

        self.config = config
        self.palette = tuple(PALETTE) + EXTRA_COLOURS
        self.tools = markups.KINDS
        self.server = get_server(server, client_type="vue3")
        self.server.options["ws_max_msg_size"] = int(config.max_upload_mb) * 1024 * 1024
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        standalone.bind(self.slicer_app.scene, self.slicer_app.app_logic)
        register_rca_factories(
            self.slicer_app.view_manager,
            self.server,
            slice_view_ui_f=self._slice_view_ui,
            three_d_view_ui_f=self._view_ui,
            # A view streams at most this often: a written segment waits for the next frame slot (1/fps).
            target_fps=60.0,
            blur_fps=30.0,
        )
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")

        self._loop: asyncio.AbstractEventLoop | None = None
        self.worker = ModelWorker(wake=self._wake)
        self.logic = SegmentationLogic(self.slicer_app.scene, self.slicer_app.app_logic, worker=self.worker)
        self.logic.schedule = self._schedule
        self.logic.on_status = self._on_status
        self.logic.on_tool = self._on_tool
        self.logic.on_segments = self._on_segments
        self.logic.on_result = self._on_result
        self.choice = ModelChoice(
            checkpoint=config.model,
            memory=config.memory,
            use_memory=config.use_memory,
            device=config.device,
            server_url=config.server_url,
            token=config.token,
            ca_file=config.ca_file,
        )
        self._model_future = None
        self._pending_volume = None
        self._opened: dict[str, object] = {}  # path -> its volume node
        self.volumes: dict[str, Volume] = {v.key: v for v in samples(sample_data_dir())}
        self.volumes.update({v.key: v for v in data_files(tuple(config.data_dirs))})
        self._upload_dir = tempfile.TemporaryDirectory(prefix="memsam-web-")

        s = self.state
        s.trame__title = config.title
        s.status = "Loading the model..."
        s.busy = True
        s.model_ready = False
        s.model_error = ""
        s.volume_loaded = False
        s.volume_name = ""
        s.tool = None
        s.segments = []
        s.current_segment = None
        s.segment_name = ""
        s.palette = [_hex(c) for c in self.palette]
        s.results = 0  # results written into the segmentation so far (tests and benchmarks wait on it)
        s.latency_ms = None
        s.decodes = None
        s.latency_breakdown = {}
        s.export_format = EXPORT_FORMATS[0]
        s.export_file = ""
        s.export_formats = list(EXPORT_FORMATS)
        s.volume_choices = [{"value": v.key, "title": v.label} for v in self.volumes.values()]
        s.volume_choice = None
        s.show_3d = False
        s.error = ""
        s.change("tool")(self._tool_changed)
        s.change("show_3d")(self._show_3d_changed)
        s.change("export_format", "volume_name")(self._export_file_changed)
        self.ctrl.on_server_ready.add(self._server_ready)
        self._build_ui()

    # ------------------------------------------------------------------------------------------ threads
    def _server_ready(self, **_) -> None:
        self._loop = asyncio.get_event_loop()
        if not self.config.server_url:
            import torch

            # The views render on this process's loop and, on a CPU-only machine, with Mesa's threads: by default
            # the model leaves them a core (measured in benchmarks/bench_web.py). Set on the model thread itself:
            # torch's CPU thread count belongs to the calling thread.
            threads = self.config.threads or max(1, (os.cpu_count() or 2) - 1)
            self.worker.submit(lambda: torch.set_num_threads(int(threads)))
        self._model_future = self.logic.load_model(self.choice)

    def _wake(self) -> None:
        """Worker thread: a job finished; deliver it on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver)

    def _schedule(self, fn) -> None:
        """The logic asks to read the markups after a placement's burst of events: next turn of the loop."""
        try:
            asyncio.get_running_loop().call_soon(self._run, fn)
        except RuntimeError:  # not on the loop (a direct call): read at once
            self._run(fn)

    def _run(self, fn) -> None:
        with self.state:
            fn()
            self._update_busy()

    def _deliver(self) -> None:
        with self.state:
            try:
                self.logic.process_events()
            except Exception as error:  # noqa: BLE001 - shown on the page, the loop goes on
                log.exception("delivering model results")
                self._on_status(f"Error: {error}")
            if not self.state.model_ready and self._model_future is not None and self._model_future.done():
                self._model_loaded()
            self._update_busy()

    def _update_busy(self) -> None:
        loading = self._model_future is not None and not self.state.model_ready
        self.state.busy = self.worker.busy or loading

    def retry_model(self) -> None:
        """Load the model again (after the server was unreachable, say)."""
        if self._model_future is None and not self.state.model_ready:
            self.state.model_error = ""
            self.state.error = ""
            self._model_future = self.logic.load_model(self.choice)
            self._update_busy()

    def _model_loaded(self) -> None:
        if self._model_future.exception() is not None:
            self.state.model_error = f"The model did not load: {self._model_future.exception()}"
            self.state.error = self.state.model_error
            self.state.model_ready = False
            self._model_future = None
            return
        self.state.model_ready = True
        if self._pending_volume is not None:
            node, self._pending_volume = self._pending_volume, None
            self._start_segmenting(node)

    # ------------------------------------------------------------------------------------ logic -> page
    def _on_status(self, text: str) -> None:
        self.state.status = text
        if text.startswith("Error"):
            self.state.error = text

    def _on_tool(self, kind: str | None) -> None:
        self.state.tool = kind

    def _on_segments(self) -> None:
        segments = self.logic.segment_list() if self.logic.segmentation is not None else []
        self.state.segments = [{**s, "hex": _hex(s["colour"])} for s in segments]
        self.state.current_segment = self.logic.current
        current = next((s for s in segments if s["current"]), None)
        self.state.segment_name = current["name"] if current else ""

    def _on_result(self, segment_id: str) -> None:
        self.state.results += 1
        self.state.latency_ms = round(self.logic.last_latency_ms, 1)
        self.state.decodes = self.logic.last_decodes
        self.state.latency_breakdown = dict(self.logic.last_breakdown)
        self._on_segments()

    # ------------------------------------------------------------------------------------ page -> logic
    def _guard(self, fn, *args):
        """Run a page action; a refusal or error becomes the page's message instead of a dead websocket."""
        try:
            return fn(*args)
        except (ValueError, KeyError, RuntimeError, OSError, TimeoutError) as error:
            text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            self.state.error = str(text)
            self.state.status = f"Error: {text}"
            return None
        finally:
            self._update_busy()

    def _tool_changed(self, tool=None, **_) -> None:
        if tool == self.logic.tool:
            return
        if tool is not None and tool not in self.tools:
            return
        if self.logic.session is None:
            self.state.tool = None
            self.state.error = "Open a volume first."
            return
        self._guard(self.logic.set_tool, tool)
        self.state.tool = self.logic.tool

    def _export_file_changed(self, **_) -> None:
        if self.state.volume_name and self.state.export_format in EXPORT_FORMATS:
            self.state.export_file = export_name(self.state.volume_name, self.state.export_format)

    def _show_3d_changed(self, show_3d=False, **_) -> None:
        node = self.logic.segmentation
        if node is None:
            return
        if show_3d:
            node.CreateClosedSurfaceRepresentation()
        else:
            node.RemoveClosedSurfaceRepresentation()

    def open_volume(self, key: str | None = None) -> None:
        """Open a sample or a data-folder file chosen on the page (its key in :attr:`volumes`)."""
        key = key or self.state.volume_choice
        volume = self.volumes.get(key or "")
        if volume is None:
            self.state.error = f"no such volume: {key!r}"
            return
        self._guard(self._load_file, volume.path)

    def upload(self, files: list[dict]) -> None:
        """Volumes sent from the browser, written into this app's own upload folder under plain names; the first
        volume file is opened (a detached NRRD header comes with its data file: upload both)."""
        from trame.app.file_upload import ClientFile

        if not files:
            return
        try:
            uploaded = [ClientFile(f) for f in files]
            names = [safe_upload_name(f.name, companion=True) for f in uploaded]
            volume = next((n for n in names if is_volume_file(n)), None)
            if volume is None:
                safe_upload_name(uploaded[0].name)  # raises, naming the file and what is accepted
        except ValueError as error:
            self.state.error = str(error)
            return
        folder = Path(self._upload_dir.name) / f"{time.monotonic_ns()}"
        folder.mkdir()
        for f, name in zip(uploaded, names):
            (folder / name).write_bytes(f.content)
        self._guard(self._load_file, str(folder / volume))

    def _load_file(self, path: str) -> None:
        """Read the volume with Slicer's reader, show it, and segment it once the model is ready."""
        self.state.error = ""
        self.state.status = f"Reading {Path(path).name}..."
        node = self._opened.get(path)
        if node is None or node.GetScene() is None:
            # A file opened before keeps its node: its segments and prompts resume instead of a second copy.
            nodes = self.slicer_app.io_manager.load_volumes([path])
            if not nodes:
                raise OSError(f"Slicer could not read {path}")
            node = self._opened[path] = nodes[0]
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        if self.config.volume_rendering:
            display.show_volume(node)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_visible_in_3d(True)
        display.reset_views()
        for view in self.slicer_app.view_manager.get_threed_views():
            camera = view.renderer().GetActiveCamera()  # oblique, so that all three slice planes show
            camera.Azimuth(35)
            camera.Elevation(25)
            view.renderer().ResetCamera()
            camera.Zoom(1.5)
            view.schedule_render()
        self.state.volume_name = node.GetName()
        self.state.volume_loaded = True
        if self.state.model_ready:
            self._start_segmenting(node)
        elif self.state.model_error:
            self._pending_volume = node
            self.state.error = self.state.model_error
        else:
            self._pending_volume = node
            self.state.status = f"{node.GetName()} open; waiting for the model..."

    def _start_segmenting(self, node) -> None:
        self.logic.set_volume(node)
        # Only this volume's segments are drawn (another volume's would lie over it where their grids overlap).
        segmentations = self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode")
        for i in range(segmentations.GetNumberOfItems()):
            seg = segmentations.GetItemAsObject(i)
            if seg.GetDisplayNode() is not None:
                seg.GetDisplayNode().SetVisibility(seg is self.logic.segmentation)
        if not self.logic.segments:
            self.logic.add_segment()
        self._show_3d_changed(self.state.show_3d)
        self._on_segments()

    def add_segment(self) -> None:
        self._guard(self.logic.add_segment)

    def select_segment(self, segment_id: str) -> None:
        self._guard(self.logic.select_segment, segment_id)
        self._on_segments()

    def delete_segment(self) -> None:
        if self.logic.current is not None:
            self._guard(self.logic.remove_segment, self.logic.current)
            self._on_segments()

    def rename_segment(self) -> None:
        if self.logic.current is not None:
            self._guard(self.logic.rename_segment, self.logic.current, self.state.segment_name or "")

    def colour_segment(self, index: int) -> None:
        if self.logic.current is not None:
            self._guard(self.logic.set_segment_colour, self.logic.current, self.palette[int(index) % len(self.palette)])

    def history(self, action: str) -> None:
        if action not in ("undo", "redo", "reset"):
            return
        if self.logic.session is not None:
            self._guard(getattr(self.logic, action))
            self.state.results += 1

    def export(self):
        """The segments as a file for the browser to save (a trame attachment), in the chosen format."""
        fmt = self.state.export_format
        if self.logic.session is None:
            self.state.error = "Open a volume and segment it first."
            return None
        name = export_name(self.state.volume_name, fmt)  # what the page names the download (export_file)
        with tempfile.TemporaryDirectory(prefix="memsam-export-") as tmp:
            path = os.path.join(tmp, name)
            if self._guard(self.logic.export, path) is None and not os.path.isfile(path):
                return None
            data = Path(path).read_bytes()
        self.state.status = f"Exported {name} ({len(data) / 1024:.0f} kB)"
        return self.server.protocol.addAttachment(data)

    # ------------------------------------------------------------------------------------------- page
    def _view_ui(self, server, view_id, view) -> None:
        from trame_client.widgets.html import Div
        from trame_slicer.app.ui import create_vertical_view_gutter_ui

        Div(id=f"view-{view_id}", classes="memsam-view-marker", style="display: none;")
        create_vertical_view_gutter_ui(server, view_id, view)

    def _slice_view_ui(self, server, view_id, view) -> None:
        from trame_client.widgets.html import Div
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

        Div(id=f"view-{view_id}", classes="memsam-view-marker", style="display: none;")
        create_vertical_slice_view_gutter_ui(server, view_id, view)

    def _build_ui(self) -> None:
        from trame.widgets import client, html
        from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame_vuetify.widgets import vuetify3 as v3

        upload = self.ctrl.trigger_name(self.upload)
        download = self.ctrl.trigger_name(self.export)
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            self.ui = layout
            client.Style("html { overflow-y: hidden; } .memsam-swatch { width: 18px; height: 18px; }")
            layout.title.set_text(self.config.title)
            with layout.toolbar:
                v3.VSpacer()
                v3.VProgressCircular(v_show=("busy",), indeterminate=True, size=22, id="busy", classes="mx-2")
                html.Span("{{ status }}", id="status", classes="text-body-2 mx-2")
                v3.VChip(
                    "last click {{ latency_ms }} ms, {{ decodes }} decode(s)",
                    v_show=("latency_ms !== null",),
                    id="latency",
                    size="small",
                    classes="mx-2",
                )
            with layout.drawer as drawer:
                drawer.width = 330
                with v3.VContainer(classes="pa-3"):
                    html.Div("Volume", classes="text-subtitle-2")
                    v3.VSelect(
                        v_model=("volume_choice",),
                        items=("volume_choices",),
                        label="Sample or server file",
                        density="compact",
                        hide_details=True,
                        id="volume-select",
                    )
                    with html.Div(classes="d-flex my-2"):
                        button("Open", "open-volume", self.open_volume, disabled=("!volume_choice",))
                        for v in self.volumes.values():
                            if v.key.startswith("sample:"):
                                button(
                                    v.key.split(":", 1)[1].split("_")[0],
                                    f"open-{v.key.replace(':', '-')}",
                                    (self.open_volume, f"['{v.key}']"),
                                    variant="tonal",
                                )
                    v3.VFileInput(
                        label="Upload a volume",
                        density="compact",
                        hide_details=True,
                        accept=".nii,.gz,.nrrd,.nhdr,.mha,.mhd,.raw,.img,.zraw",
                        change=f"trigger('{upload}', [$event.target.files])",
                        multiple=True,
                        id="upload",
                    )
                    v3.VDivider(classes="my-3")
                    html.Div("Tool", classes="text-subtitle-2")
                    with v3.VBtnToggle(
                        v_model=("tool",),
                        disabled=("!model_ready || !volume_loaded",),
                        density="compact",
                        divided=True,
                        variant="outlined",
                    ):
                        v3.VBtn("Include", value="include", id="tool-include", size="small")
                        v3.VBtn("Exclude", value="exclude", id="tool-exclude", size="small")
                        v3.VBtn("Box", value="box", id="tool-box", size="small")
                    with html.Div(classes="d-flex my-2"):
                        button("Undo", "undo", (self.history, "['undo']"), classes="")
                        button("Redo", "redo", (self.history, "['redo']"))
                        button("Reset", "reset", (self.history, "['reset']"))
                    v3.VDivider(classes="my-3")
                    html.Div("Segments", classes="text-subtitle-2")
                    with v3.VList(density="compact", id="segments"):
                        with v3.VListItem(
                            v_for="s in segments",
                            key="s.id",
                            active=("s.current",),
                            click=(self.select_segment, "[s.id]"),
                            classes="memsam-segment",
                        ):
                            with html.Div(classes="d-flex align-center"):
                                html.Div(classes="memsam-swatch mr-2 rounded", style=("{ background: s.hex }",))
                                html.Span("{{ s.name }}", classes="memsam-segment-name")
                                v3.VSpacer()
                                html.Span("{{ s.prompts }} prompt(s)", classes="text-caption")
                    with html.Div(classes="d-flex my-2"):
                        button("Add", "add-segment", self.add_segment, disabled=("!volume_loaded",), classes="")
                        button("Delete", "delete-segment", self.delete_segment, disabled=("!current_segment",))
                    with html.Div(classes="d-flex align-center"):
                        v3.VTextField(
                            v_model=("segment_name",),
                            label="Name",
                            density="compact",
                            hide_details=True,
                            id="segment-name",
                        )
                        button("Rename", "rename", self.rename_segment)
                    with html.Div(classes="d-flex my-2"):
                        html.Div(
                            v_for="(c, i) in palette",
                            key="i",
                            classes="memsam-swatch mr-1 rounded",
                            style=("{ background: c, cursor: 'pointer' }",),
                            click=(self.colour_segment, "[i]"),
                            id=("`colour-${i}`",),
                        )
                    v3.VCheckbox(
                        v_model=("show_3d",), label="Show segments in 3D", density="compact", hide_details=True
                    )
                    v3.VDivider(classes="my-3")
                    html.Div("Export", classes="text-subtitle-2")
                    with html.Div(classes="d-flex align-center"):
                        v3.VSelect(
                            v_model=("export_format",),
                            items=("export_formats",),
                            density="compact",
                            hide_details=True,
                            id="export-format",
                        )
                        button(
                            "Download",
                            "export",
                            f"utils.download(export_file, trigger('{download}'), 'application/octet-stream')",
                            disabled=("!volume_loaded",),
                        )
                    button(
                        "Load the model again", "retry-model", self.retry_model, v_show=("model_error",), classes="mt-3"
                    )
                    v3.VAlert(
                        "{{ error }}",
                        v_show=("error",),
                        type="error",
                        density="compact",
                        classes="mt-3",
                        id="error",
                    )
            with layout.content:
                with v3.VContainer(fluid=True, classes="pa-0 fill-height"):
                    self.layout_manager.initialize_layout_grid(layout)

    def close(self) -> None:
        self.logic.close()
        self.worker.shutdown()
        self._upload_dir.cleanup()


def main(config: WebConfig, open_browser: bool = False) -> None:
    """Serve the page until interrupted."""
    app = WebApp(config)
    print(f"MemorizingSAM web: http://{config.host}:{config.port}/", flush=True)
    try:
        app.server.start(host=config.host, port=config.port, open_browser=open_browser, show_connection_info=False)
    finally:
        app.close()
