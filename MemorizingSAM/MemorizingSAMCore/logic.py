"""SegmentationLogic: the whole module below its Qt widgets, on Slicer's own MRML.

Markups events in, segments out. A placed, moved or deleted point (or box) is read from its markups node on the
GUI thread and turned into the segment's prompt list in placement order, with voxel indices; the worker thread
hands that list to the session's ``set_prompts``, which decodes only from the first changed prompt (one decode
for a new click); the changed box of the mask comes back and is written into the segment's own labelmap layer.
Undo, redo and reset rebuild the markups from the prompts the session holds after them, so points follow.

Threads: MRML is read and written only here, on the thread that owns the scene; the worker runs the model and
the session and returns arrays. No ``slicer.app`` and no Qt: it runs in Slicer and on the ``slicer-core`` wheel.
The library (and torch) is imported when a model is loaded, not when Slicer starts.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer
import vtk
from slicer.util import VTKObservationMixin

from . import markups, mrml, remote
from .worker import ModelWorker

if TYPE_CHECKING:  # the library is imported when a model loads, not when Slicer starts
    from MemorizingSAMLib.protocol import SegmentationSession

SEGMENTATION_VOLUME_ATTRIBUTE = "MemorizingSAM.Volume"


@dataclass(frozen=True)
class ModelChoice:
    """Which model runs the clicks. ``checkpoint`` None: the shipped default model, with its memory bank unless
    ``memory`` names another (``use_memory`` False: none). ``server_url``: a ``memsam serve`` elsewhere instead."""

    checkpoint: str | None = None
    memory: str | None = None
    use_memory: bool = True
    device: str = "cpu"
    server_url: str | None = None
    token: str | None = None  # from Slicer's settings (remote.py), never from or into the scene
    ca_file: str | None = None


@dataclass
class Record:
    """A placed prompt as the markups showed it (what rebuilds the markups after undo): world RAS position of a
    point, or an ROI's geometry."""

    tag: str
    kind: str
    world: list[float] | None = None
    roi: dict | None = None

    def to_json(self) -> dict:
        return {"tag": self.tag, "kind": self.kind, "world": self.world, "roi": self.roi}

    @classmethod
    def from_json(cls, d: dict) -> Record:
        return cls(d["tag"], d["kind"], d.get("world"), d.get("roi"))


@dataclass
class Result:
    """What a job hands back to the GUI thread: the changed box and its voxels, the prompts after the step."""

    region: Any  # MemorizingSAMLib.paste.Region or None
    voxels: np.ndarray | None
    placed: tuple
    timing: dict
    started: float = 0.0  # perf_counter on the worker when the job began and ended
    finished: float = 0.0


@dataclass
class SegmentPrompts:
    """The module's side of one segment: its session id, its prompts' tags in placement order, and the prompt
    tuple last sent to the session."""

    sid: int
    order: list[str] = field(default_factory=list)
    sent: tuple = ()


class SegmentationLogic(VTKObservationMixin):
    """Interactive segmentation of one volume at a time in a Slicer scene.

    ``scene`` and ``app_logic`` are Slicer's (``slicer.mrmlScene``, ``slicer.app.applicationLogic()``). Listeners:
    ``on_status(text)``, ``on_tool(kind or None)``, ``on_segments()`` (the list changed), ``on_result(segment_id)``.
    """

    EVENTS = (
        "PointPositionDefinedEvent",
        "PointRemovedEvent",
        "PointModifiedEvent",
        "PointStartInteractionEvent",
        "PointEndInteractionEvent",
    )

    def __init__(self, scene, app_logic, worker: ModelWorker | None = None) -> None:
        VTKObservationMixin.__init__(self)
        self.scene = scene
        self.app_logic = app_logic
        self._own_worker = worker is None
        self.worker = worker or ModelWorker()
        self.worker.on_error = self._on_error
        self.on_status: Callable[[str], None] = lambda text: None
        self.on_tool: Callable[[str | None], None] = lambda kind: None
        self.on_segments: Callable[[], None] = lambda: None
        self.on_result: Callable[[str], None] = lambda segment_id: None
        self.status = ""
        self.model_description = ""
        self._make_session: Callable[[], SegmentationSession] | None = None
        self.session: SegmentationSession | None = None
        self.volume = None
        self.segmentation = None
        self.segments: dict[str, SegmentPrompts] = {}
        self.current: str | None = None
        self.tool: str | None = None
        self.records: dict[str, Record] = {}
        self.last_latency_ms = 0.0
        self.last_decodes = 0
        self.last_breakdown: dict[str, float] = {}
        self.loaded_on = ""  # the thread the model was loaded on
        self._tags = 0
        self._muted = 0
        self._dragging: set[str] = set()
        self._dirty: set[str] = set()
        self._ijk: dict[tuple, np.ndarray] = {}  # (tag, world position) -> (i, j, k) on the current volume
        self._dirty_since = 0.0
        # How markups changes get read after the events of one placement: ``schedule(flush)`` runs flush soon on
        # the GUI thread (Slicer's widget: a zero-delay Qt timer); None: at the next process_events() or wait().
        self.schedule: Callable[[Callable[[], None]], None] | None = None
        self.addObserver(self._interaction(), slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent, self._on_mode)
        self.addObserver(
            self._selection(), slicer.vtkMRMLSelectionNode.ActivePlaceNodeIDChangedEvent, self._on_active_place_node
        )
        self.addObserver(scene, slicer.vtkMRMLScene.StartSaveEvent, self.save_prompts)
        # One handler per event id: VTK hands Python observers an event *name*, and for the markups' own events
        # (ids past vtkCommand::UserEvent) that name is "NoEvent", so one shared handler could not tell a drag's
        # start and end from a move.
        self._markups_handlers = {
            event: functools.partial(self._on_markups_event, event)
            for event in [getattr(slicer.vtkMRMLMarkupsNode, name) for name in self.EVENTS]
            + [vtk.vtkCommand.ModifiedEvent]
        }

    # ----------------------------------------------------------------------------------------------- model
    def load_model(self, choice: ModelChoice = ModelChoice()):
        """Load the model on the worker thread (returns its Future; the GUI stays responsive). Clicks wait for it."""
        self._say("Loading the model...")

        def load():
            self.loaded_on = threading.current_thread().name
            if choice.server_url:
                settings = remote.RemoteSettings(choice.server_url, choice.token or "", choice.ca_file or "")
                ok, message = remote.check_connection(settings)
                if not ok:
                    raise ConnectionError(message)

                def make():
                    return remote.make_client(settings)

                return make, f"remote {choice.server_url}"
            from MemorizingSAMLib.checkpoints import load_model
            from MemorizingSAMLib.memory_bank import MemoryBank
            from MemorizingSAMLib.resources import default_bank_path, default_model_path
            from MemorizingSAMLib.session import InteractiveSession

            path = choice.checkpoint or default_model_path()
            model = load_model(path, device=choice.device).prepare_for_inference()
            bank_path = choice.memory or (default_bank_path() if choice.checkpoint is None else None)
            memory = MemoryBank.load(bank_path, model) if bank_path and choice.use_memory else None

            def make():
                return InteractiveSession(model, memory=memory)

            with_bank = f", memory bank {Path(bank_path).name}" if memory else ""
            return make, f"{model.cfg.name} on {choice.device}{with_bank}"

        def loaded(result):
            self.use_session(*result)
            self._say(f"Model ready: {self.model_description}")

        return self.worker.submit(load, loaded)

    def use_session(self, make: Callable[[], SegmentationSession], description: str) -> None:
        """Clicks run in sessions made by ``make()`` (an InteractiveSession or RemoteSession factory, or anything
        that satisfies MemorizingSAMLib.protocol.SegmentationSession): a model the caller loaded already."""
        self._make_session, self.model_description = make, description

    # ---------------------------------------------------------------------------------------------- volume
    def set_volume(self, volume_node, segmentation_node=None) -> None:
        """Segment ``volume_node`` (clicks wait for the model to load). Its segmentation node is the one given, or
        the one the module made for it before (its segments and prompts resume), or a new one."""
        mrml.check_volume(volume_node)
        self.wait()
        self.save_prompts()
        if self._make_session is None:
            raise RuntimeError("no model: call load_model first")
        self.set_tool(None)
        self._unobserve_prompts()
        image = mrml.volume_to_sitk(volume_node)
        make = self._make_session

        def start():
            from MemorizingSAMLib.protocol import SegmentationSession

            session = make()
            if not isinstance(session, SegmentationSession):
                raise TypeError(f"{type(session).__name__} does not provide the SegmentationSession calls")
            session.set_image(image)
            return session

        self.session = self.worker.call(start)
        if self.volume is not None:
            self.removeObserver(self.volume, slicer.vtkMRMLTransformableNode.TransformModifiedEvent, self._on_moved)
        self.volume = volume_node
        # Moving the volume (its parent transform) changes every prompt's voxel indices; the next change uses them.
        self.addObserver(volume_node, slicer.vtkMRMLTransformableNode.TransformModifiedEvent, self._on_moved)
        self.segmentation = segmentation_node or self._segmentation_for(volume_node)
        self.segmentation.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        self.segments.clear()
        self.records.clear()
        self._ijk.clear()
        self.current = None
        self._resume()
        self.on_segments()
        self._say(f"Ready: {volume_node.GetName()} ({self.model_description})")

    def _on_moved(self, caller=None, event=None) -> None:
        self._ijk.clear()

    def _segmentation_for(self, volume_node):
        nodes = self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(SEGMENTATION_VOLUME_ATTRIBUTE) == volume_node.GetID():
                return node
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", volume_node.GetName() + " MemorizingSAM")
        node.SetAttribute(SEGMENTATION_VOLUME_ATTRIBUTE, volume_node.GetID())
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return node

    def _resume(self) -> None:
        """Segments the module made earlier in this segmentation get their prompts back (replayed once)."""
        saved = mrml.load_prompts(self.segmentation)
        segmentation = self.segmentation.GetSegmentation()
        for segment_id, records in saved.items():
            if segmentation.GetSegment(segment_id) is None:
                continue
            self._register(segment_id)
            for r in records:
                record = Record.from_json(r)
                self.records[record.tag] = record
                self._tags = max(self._tags, int(record.tag[len(markups.TAG_PREFIX) :]))
            self._rebuild_markups(segment_id, [Record.from_json(r).tag for r in records])
            self._sync(segment_id)
        self.wait()
        if self.segments:
            self.current = next(iter(self.segments))

    # -------------------------------------------------------------------------------------------- segments
    def add_segment(self, name: str | None = None) -> str:
        """A new segment (its own labelmap layer) made current; returns its segment id."""
        self._require_volume()
        names = {self._segment(sid).GetName() for sid in self.segments}
        n = len(self.segments) + 1
        while f"Segment_{n}" in names:  # after a deletion, the next free number
            n += 1
        segment_id = mrml.new_segment(self.segmentation, self.volume, name or f"Segment_{n}", _colour(n))
        self._register(segment_id)
        self.select_segment(segment_id)
        self.on_segments()
        return segment_id

    def _register(self, segment_id: str) -> None:
        name = self.segmentation.GetSegmentation().GetSegment(segment_id).GetName()
        sid = self.worker.call(lambda: self.session.add_segment(name))
        self.segments[segment_id] = SegmentPrompts(sid)
        for kind in markups.KINDS:
            nodes = markups.prompt_nodes(self.scene, self.volume.GetID(), segment_id, kind)
            if not nodes:
                nodes = [markups.new_prompt_node(self.scene, self.volume.GetID(), segment_id, name, kind)]
            for node in nodes:
                self._observe(node)

    def remove_segment(self, segment_id: str) -> None:
        """Delete the segment: its voxels, its prompt markups and its session segment (after running clicks)."""
        self._segment(segment_id)  # refuses segments the module did not make
        self.wait()
        seg = self.segments.pop(segment_id)
        self._muted += 1
        try:
            for kind in markups.KINDS:
                for node in markups.prompt_nodes(self.scene, self.volume.GetID(), segment_id, kind):
                    self.scene.RemoveNode(node)
            self.segmentation.GetSegmentation().RemoveSegment(segment_id)
        finally:
            self._muted -= 1
        session = self.session
        self.worker.call(lambda: session.remove_segment(seg.sid))
        self._dirty.discard(segment_id)
        if self.current == segment_id:
            self.current = next(iter(self.segments), None)
            if self.tool is not None:
                self.set_tool(self.tool if self.current is not None else None)
        self.save_prompts()
        self.on_segments()

    def rename_segment(self, segment_id: str, name: str) -> None:
        """A new name for the segment and its prompt markups (an empty name is refused)."""
        name = name.strip()
        if not name:
            raise ValueError("a segment needs a name")
        segment = self._segment(segment_id)
        segment.SetName(name)
        for kind in markups.KINDS:
            for node in markups.prompt_nodes(self.scene, self.volume.GetID(), segment_id, kind):
                node.SetName(self.scene.GenerateUniqueName(f"{name} {kind}"))
        self.on_segments()

    def set_segment_colour(self, segment_id: str, rgb: tuple[float, float, float]) -> None:
        """The segment's display colour, ``rgb`` in 0..1."""
        rgb = tuple(float(c) for c in rgb)
        if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
            raise ValueError(f"a colour is three values in 0..1, got {rgb}")
        self._segment(segment_id).SetColor(*rgb)
        self.on_segments()

    def segment_list(self) -> list[dict]:
        """The module's segments in creation order: id, name, colour (0..1 RGB), prompts placed, current."""
        if self.segmentation is None:
            return []
        segmentation = self.segmentation.GetSegmentation()
        out = []
        for segment_id, seg in self.segments.items():
            segment = segmentation.GetSegment(segment_id)
            out.append(
                {
                    "id": segment_id,
                    "name": segment.GetName(),
                    "colour": [round(float(c), 4) for c in segment.GetColor()],
                    "prompts": len(seg.sent),
                    "current": segment_id == self.current,
                }
            )
        return out

    def _segment(self, segment_id: str):
        self._require_volume()
        if segment_id not in self.segments:
            raise KeyError(f"segment {segment_id!r} was not made by MemorizingSAM on this volume")
        return self.segmentation.GetSegmentation().GetSegment(segment_id)

    def select_segment(self, segment_id: str) -> None:
        if segment_id not in self.segments:
            raise KeyError(f"segment {segment_id!r} was not made by MemorizingSAM on this volume")
        self.current = segment_id
        if self.tool is not None:
            self.set_tool(self.tool)  # place into the new current segment's node

    def _require_volume(self) -> None:
        if self.volume is None or self.session is None:
            raise RuntimeError("no volume: choose a volume first")

    # ----------------------------------------------------------------------------------------------- tools
    def set_tool(self, kind: str | None) -> None:
        """Place ``kind`` prompts ("include", "exclude", "box") into the current segment, or stop placing (None).
        One tool at a time; it follows Slicer's interaction mode when the user leaves place mode."""
        interaction = self._interaction()
        if kind is None:
            self.tool = None
            if interaction.GetCurrentInteractionMode() == interaction.Place:
                interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            self.on_tool(None)
            return
        if kind not in markups.KINDS:
            raise ValueError(f"tool must be one of {markups.KINDS} or None, got {kind!r}")
        self._require_volume()
        if self.current is None:
            self.add_segment()
        if kind == "box":
            # A placed ROI is full; a new box is a new node (Slicer would make one anyway), replacing the old
            # box once it is placed. Boxes started but never placed go.
            for roi in markups.prompt_nodes(self.scene, self.volume.GetID(), self.current, "box"):
                if roi.GetNumberOfControlPoints() == 0:
                    self.scene.RemoveNode(roi)
            node = markups.new_prompt_node(self.scene, self.volume.GetID(), self.current, self._name(), "box")
            self._observe(node)
        else:
            node = markups.prompt_nodes(self.scene, self.volume.GetID(), self.current, kind)[-1]
        self.tool = kind
        selection = self._selection()
        self._muted += 1
        try:
            selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
            selection.SetActivePlaceNodeID(node.GetID())
        finally:
            self._muted -= 1
        interaction.SetPlaceModePersistence(0 if kind == "box" else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        self.on_tool(kind)

    def _on_mode(self, caller=None, event=None) -> None:
        interaction = self._interaction()
        if self.tool is not None and interaction.GetCurrentInteractionMode() != interaction.Place:
            self.tool = None
            self.on_tool(None)

    def _on_active_place_node(self, caller=None, event=None) -> None:
        if self._muted or self.tool is None:
            return
        node = self.scene.GetNodeByID(self._selection().GetActivePlaceNodeID() or "")
        who = markups.owner(node)
        if who is None and node is not None and node.IsA("vtkMRMLMarkupsROINode") and self.tool == "box":
            # Place persistence made a new ROI after the box was placed: it is the next box of this segment.
            markups.adopt(node, self.volume.GetID(), self.current, "box")
            self._observe(node)
        elif who is None or who.kind != self.tool:
            self.tool = None
            self.on_tool(None)

    # -------------------------------------------------------------------------------------------- prompts
    def _observe(self, node) -> None:
        for event, handler in self._markups_handlers.items():
            if event == vtk.vtkCommand.ModifiedEvent and not node.IsA("vtkMRMLMarkupsROINode"):
                continue
            if not self.hasObserver(node, event, handler):
                self.addObserver(node, event, handler)

    def _unobserve_prompts(self) -> None:
        for handler in self._markups_handlers.values():
            self.removeObservers(method=handler)
        self._dragging.clear()

    def _on_markups_event(self, event: int, node, _name: str) -> None:
        self._on_markups(node, event)

    def _on_markups(self, node, event: int) -> None:
        """``event``: the event's id (vtkMRMLMarkupsNode.PointModifiedEvent, ...)."""
        if self._muted:
            return
        who = markups.owner(node)
        if (
            who is None
            or self.volume is None
            or who.volume_id != self.volume.GetID()
            or who.segment_id not in self.segments
        ):
            return
        if event == slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent:
            self._dragging.add(node.GetID())
            return
        if event == slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent:
            self._dragging.discard(node.GetID())
        elif node.GetID() in self._dragging:
            return  # a drag recomputes once, when it ends
        # One placement fires several events, some in the middle of Slicer's update of the node (an ROI's second
        # click: seven): the segment is read once, after the burst.
        if not self._dirty:
            self._dirty_since = time.perf_counter()
            if self.schedule is not None:
                self.schedule(self.flush)
        self._dirty.add(who.segment_id)
        if event == slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent and node.IsA("vtkMRMLMarkupsFiducialNode"):
            # A point list's placement ends with its point defined (its position is final): read it now, not
            # behind whatever the GUI thread does next (the views' renders, in the web app ~0.1 s). An ROI is
            # still mid-update at this event and waits for the scheduled read.
            self.flush()

    def flush(self) -> None:
        """Read the segments whose markups changed and send their prompts (see :attr:`schedule`)."""
        dirty, self._dirty = self._dirty, set()
        for segment_id in dirty:
            if segment_id in self.segments:
                self._sync(segment_id, self._dirty_since)

    def _new_tag(self) -> str:
        self._tags += 1
        return f"{markups.TAG_PREFIX}{self._tags}"

    def _read(self, segment_id: str) -> dict[str, Record]:
        """The segment's placed prompts as the markups show them now (new points get their tag here)."""
        found: dict[str, Record] = {}
        volume_id = self.volume.GetID()
        self._muted += 1
        try:
            for kind in ("include", "exclude"):
                for node in markups.prompt_nodes(self.scene, volume_id, segment_id, kind):
                    for i, tag, world in markups.defined_points(node):
                        if tag is None or tag in found:
                            tag = self._new_tag()
                            markups.set_point_tag(node, i, tag)
                        found[tag] = Record(tag, kind, world=[float(v) for v in world])
            rois = markups.prompt_nodes(self.scene, volume_id, segment_id, "box")
            placed = [r for r in rois if mrml.roi_box_ijk(r, self.volume) is not None]
            for old in placed[:-1]:  # one box per segment: the newest placed ROI replaces the others
                self.scene.RemoveNode(old)
            if placed:
                roi = placed[-1]
                tag = roi.GetAttribute("MemorizingSAM.Tag")
                if not tag:
                    tag = self._new_tag()
                    roi.SetAttribute("MemorizingSAM.Tag", tag)
                found[tag] = Record(tag, "box", roi=mrml.roi_geometry(roi))
        finally:
            self._muted -= 1
        return found

    def _prompts(self, records: list[Record]) -> tuple[tuple, list[str]]:
        """Library prompts for ``records`` (voxel indices of the volume), and a note for each one left out."""
        from MemorizingSAMLib.session import Prompt

        dims = np.array(self.volume.GetImageData().GetDimensions(), dtype=float)
        # Each position is converted once (a click converts only itself); the cache goes with the volume.
        todo = [r for r in records if r.kind != "box" and (r.tag, tuple(r.world)) not in self._ijk]
        if todo:
            for r, p in zip(todo, mrml.world_to_ijk(self.volume, np.array([r.world for r in todo]))):
                self._ijk[(r.tag, tuple(r.world))] = p
        by_tag = {r.tag: self._ijk[(r.tag, tuple(r.world))] for r in records if r.kind != "box"}
        if by_tag:
            ijk = np.array(list(by_tag.values()))
            inside = dict(zip(by_tag, np.all((ijk >= -0.5) & (ijk <= dims - 0.5), axis=1)))
        out, skipped = [], []
        for r in records:
            if r.kind == "box":
                box = self._box_of(r)
                if box is None:
                    skipped.append("the box misses the volume")
                    continue
                out.append(Prompt(tuple(float(v) for v in box[0]), True, tuple(float(v) for v in box[1]), r.tag))
                continue
            p = by_tag[r.tag]
            if not inside[r.tag]:
                skipped.append(f"the {r.kind} point at RAS {np.round(r.world, 1).tolist()} lies outside the volume")
                continue
            out.append(Prompt(tuple(float(v) for v in p), r.kind == "include", None, r.tag))
        return tuple(out), skipped

    def _box_of(self, record: Record):
        roi = self._roi_for(record.tag)
        return None if roi is None else mrml.roi_box_ijk(roi, self.volume)

    def _roi_for(self, tag: str):
        nodes = self.scene.GetNodesByClass("vtkMRMLMarkupsROINode")
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute("MemorizingSAM.Tag") == tag:
                return node
        return None

    def _sync(self, segment_id: str, t0: float | None = None) -> None:
        """The markups of a segment changed: send its prompts, in placement order, if they differ."""
        t0 = time.perf_counter() if t0 is None else t0
        seg = self.segments[segment_id]
        found = self._read(segment_id)
        order = [t for t in seg.order if t in found] + [t for t in found if t not in seg.order]
        self.records.update(found)
        seg.order = order
        prompts, skipped = self._prompts([found[t] for t in order])
        if skipped:
            self._say("Ignored: " + "; ".join(skipped))
        if prompts == seg.sent:
            return
        seg.sent = prompts
        session = self.session

        flushed = time.perf_counter()

        def job():
            # Each change is its own step (undo takes back one click), queued behind the running ones.
            started = time.perf_counter()
            result = self._result(seg.sid, session.set_prompts(list(prompts), seg.sid))
            result.started, result.finished = started, time.perf_counter()
            result.timing["flushed"] = flushed
            return result

        def done(result):
            self._write(segment_id, result, t0)

        def failed(error):
            seg.sent = ()  # the session kept its previous state; the next change resends everything
            self._on_error(error)

        self.worker.submit(job, done, failed)

    def _result(self, sid: int, region) -> Result:
        """Worker side: copy out the changed voxels (the next job may already change the mask)."""
        session = self.session
        voxels = None if region is None else session.mask(sid)[region.slices].copy()
        return Result(region, voxels, tuple(session.placed(sid)), dict(session.last_timing))

    def _write(self, segment_id: str, result: Result, t0: float | None = None) -> None:
        delivered = time.perf_counter()
        if mrml.shares_layer(self.segmentation, segment_id):
            # Layers were collapsed behind our back: where segments overlapped, the shared layer kept one label,
            # so this segment may have lost voxels the session still has. The whole mask goes back, whether or
            # not this step changed anything.
            sid = self.segments[segment_id].sid
            full = self.worker.call(lambda: self.session.mask(sid).copy())
            mrml.write_segment_region(
                self.segmentation, segment_id, self.volume, full, tuple(slice(0, n) for n in full.shape)
            )
        elif result.region is not None:
            mrml.write_segment_region(self.segmentation, segment_id, self.volume, result.voxels, result.region.slices)
        if t0 is not None:
            written = time.perf_counter()
            self.last_latency_ms = (written - t0) * 1e3
            self.last_decodes = int(result.timing.get("decodes", 0))
            # Where the click's time went (ms): the markups events read, waiting for the model thread, the
            # session's work, waiting for the GUI thread to take the result, and the write into the segment.
            flushed = result.timing.get("flushed", t0)
            self.last_breakdown = {
                "read_markups": round((flushed - t0) * 1e3, 2),
                "queued": round((result.started - flushed) * 1e3, 2),
                "session": round((result.finished - result.started) * 1e3, 2),
                "delivered": round((delivered - result.finished) * 1e3, 2),
                "write": round((written - delivered) * 1e3, 2),
            }
        self.on_result(segment_id)

    def save_prompts(self, caller=None, event=None) -> None:
        """Store every segment's prompts in the segmentation node (done when the scene is saved, and before the
        volume changes; not per click, where it would cost a JSON dump and a node-modified event each time)."""
        if self.segmentation is None:
            return
        mrml.save_prompts(
            self.segmentation,
            {
                sid: [self.records[t].to_json() for t in seg.order if t in self.records]
                for sid, seg in self.segments.items()
            },
        )

    # --------------------------------------------------------------------------------------------- history
    def undo(self, segment_id: str | None = None) -> None:
        self._history("undo", segment_id)

    def redo(self, segment_id: str | None = None) -> None:
        self._history("redo", segment_id)

    def reset(self, segment_id: str | None = None) -> None:
        self._history("reset", segment_id)

    def _history(self, action: str, segment_id: str | None) -> None:
        """Undo / redo / reset after the running and queued clicks; the markups then show the prompts the
        session holds, and the scene's saved prompts follow."""
        self._require_volume()
        segment_id = segment_id or self.current
        if segment_id is None:
            return
        seg = self.segments[segment_id]
        self.wait()
        session = self.session
        result = self.worker.call(lambda: self._result(seg.sid, getattr(session, action)(seg.sid)))
        seg.sent = result.placed
        self._rebuild_markups(segment_id, [p.tag for p in result.placed])
        self._write(segment_id, result)
        self.save_prompts()

    def _rebuild_markups(self, segment_id: str, tags: list[str]) -> None:
        seg = self.segments[segment_id]
        seg.order = [t for t in tags if t in self.records]
        records = [self.records[t] for t in seg.order]
        volume_id = self.volume.GetID()
        self._muted += 1
        try:
            for kind in ("include", "exclude"):
                nodes = markups.prompt_nodes(self.scene, volume_id, segment_id, kind)
                if not nodes:  # the user deleted it
                    nodes = [markups.new_prompt_node(self.scene, volume_id, segment_id, self._name(segment_id), kind)]
                    self._observe(nodes[0])
                for extra in nodes[1:]:
                    extra.RemoveAllControlPoints()
                markups.set_points(nodes[0], [(r.tag, r.world) for r in records if r.kind == kind])
            box = next((r for r in records if r.kind == "box"), None)
            rois = markups.prompt_nodes(self.scene, volume_id, segment_id, "box")
            for roi in rois[1:]:
                self.scene.RemoveNode(roi)
            if not rois:
                rois = [markups.new_prompt_node(self.scene, volume_id, segment_id, self._name(segment_id), "box")]
            roi = rois[0]
            self._observe(roi)
            if box is None:
                roi.RemoveAllControlPoints()
                roi.RemoveAttribute("MemorizingSAM.Tag")
            else:
                mrml.set_roi_geometry(roi, box.roi)
                roi.SetAttribute("MemorizingSAM.Tag", box.tag)
        finally:
            self._muted -= 1

    # ---------------------------------------------------------------------------------------------- export
    def export(self, path: str) -> None:
        """All segments as a labelmap (.nii.gz, .nrrd: the volume's grid) or the segmentation (.seg.nrrd)."""
        self._require_volume()
        self.wait()
        mrml.export_labelmap(self.segmentation, self.volume, path, self.scene)
        self._say(f"Exported {path}")

    # ---------------------------------------------------------------------------------------------- plumbing
    def process_events(self) -> int:
        """Read changed markups and deliver finished model work (call from the GUI thread's timer)."""
        self.flush()
        return self.worker.deliver()

    def wait(self) -> None:
        """Until the changes made so far are computed and written into the segments."""
        self.flush()
        self.worker.wait()

    def close(self) -> None:
        """Finish the pending work and stop observing; the model thread ends unless it was given."""
        self.wait()
        self.removeObservers()
        if self._own_worker:
            self.worker.shutdown()

    def _on_error(self, error: BaseException) -> None:
        if hasattr(error, "status"):  # a remote server's answer: said the way a user can act on it
            self._say(f"Error: {remote.explain(error)}")
        else:
            self._say(f"Error: {error}")

    def _say(self, text: str) -> None:
        self.status = text
        self.on_status(text)

    def _name(self, segment_id: str | None = None) -> str:
        return self.segmentation.GetSegmentation().GetSegment(segment_id or self.current).GetName()

    def _interaction(self):
        return self.app_logic.GetInteractionNode()

    def _selection(self):
        return self.app_logic.GetSelectionNode()


# Segment colours (0..1 RGB), in the order new segments take them.
PALETTE = ((0.9, 0.4, 0.1), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.8, 0.3, 0.8), (0.9, 0.8, 0.2), (0.4, 0.8, 0.8))


def _colour(n: int) -> tuple[float, float, float]:
    return PALETTE[(n - 1) % len(PALETTE)]
