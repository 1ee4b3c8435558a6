"""HTTP inference server: one machine with the model (a GPU in the basement) serves many Slicer clients.

    memsam serve --model CKPT [--memory BANK] --host 127.0.0.1 --port 8765 [--token-file F]

Endpoints (JSON unless stated; OpenAPI schema at /openapi.json):
    GET    /health                                   liveness
    GET    /info                                     model, device, limits
    POST   /sessions?format=nii.gz|nrrd|npz          body: the volume (file bytes, or an .npz with array [k,j,i],
                                                     spacing, origin, direction); -> session id and geometry
    POST   /sessions/{sid}/segments                  -> new segment id
    POST   /sessions/{sid}/segments/{seg}/points     {"ijk": [i,j,k], "include": true}   -> changed region
    POST   /sessions/{sid}/segments/{seg}/boxes      {"ijk_min": [...], "ijk_max": [...]} -> changed region
    POST   /sessions/{sid}/segments/{seg}/prompts    {"prompts": [{"ijk", "include", "box_hi"}]} -> changed region
    POST   /sessions/{sid}/segments/{seg}/undo|redo|reset                                -> changed region
    DELETE /sessions/{sid}
A changed region is {"lo": [i,j,k], "hi": [i,j,k], "data": base64 of zlib-compressed uint8 [k,j,i] bytes} or null.

Safety: binds 127.0.0.1 unless told otherwise; a bearer token (constant-time comparison) when configured; caps on
upload bytes, voxels per volume, sessions (least recently used evicted) and an idle timeout; every bad request
gets a 4xx naming the problem and the server keeps serving. One model, one model thread: requests take turns.
"""

from __future__ import annotations

import base64
import hmac
import io
import secrets
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch

try:  # optional dependency (pip install MemorizingSAMLib[server]); imported here so FastAPI can resolve annotations
    from fastapi import Body, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
except ImportError:  # pragma: no cover - reported by create_app
    FastAPI = None

from .capabilities import capabilities
from .geometry import ImageError, check_file, image_from_array
from .paste import Region
from .session import InteractiveSession, Prompt, PromptError, SessionOptions

# A refused upload is read to its end (up to this many bytes more) before the answer: a server that answers and
# closes while the client is still sending makes the client's send fail ("Broken pipe": 18 of 300 uploads of 1 MB
# over a 1 MB limit here), and the client never sees the 413 and its reason. Larger ones are cut off.
DRAIN_MAX_BYTES = 64 * 2**20


async def discard_body(request: Request, max_bytes: int = DRAIN_MAX_BYTES) -> None:
    """Read and drop the rest of the request body, at most ``max_bytes``."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            return


@dataclass(frozen=True)
class ServerLimits:
    max_upload_bytes: int = 512 * 2**20
    max_voxels: int = 1024**3
    max_sessions: int = 16
    idle_timeout_s: float = 3600.0
    cache_bytes_per_session: int = 256 * 2**20
    undo_bytes_per_segment: int = 64 * 2**20  # SessionOptions.max_undo_bytes of the server's sessions


def encode_region(mask: np.ndarray, region: Region | None) -> dict | None:
    if region is None or region.empty:
        return None
    data = zlib.compress(np.ascontiguousarray(mask[region.slices]).tobytes(), 1)
    return {"lo": list(region.lo), "hi": list(region.hi), "data": base64.b64encode(data).decode()}


def decode_region_into(mask: np.ndarray, payload: dict | None) -> Region | None:
    if not payload:
        return None
    region = Region(tuple(payload["lo"]), tuple(payload["hi"]))
    shape = tuple(h - l for l, h in zip(region.lo[::-1], region.hi[::-1]))
    mask[region.slices] = np.frombuffer(zlib.decompress(base64.b64decode(payload["data"])), np.uint8).reshape(shape)
    return region


def prompt_to_json(p: Prompt) -> dict:
    """A prompt on the wire: voxel indices (i, j, k), polarity, the box's high corner, the caller's tag."""
    return {"ijk": list(p.ijk), "include": p.include, "box_hi": list(p.box_hi) if p.box_hi else None, "tag": p.tag}


def prompt_from_json(d: dict) -> Prompt:
    tag = d.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"a prompt's tag must be a string, got {tag!r}")
    box_hi = tuple(float(v) for v in d["box_hi"]) if d.get("box_hi") else None
    return Prompt(tuple(float(v) for v in d["ijk"]), bool(d.get("include", True)), box_hi, tag)


def read_volume(body: bytes, fmt: str) -> sitk.Image:
    """A volume from uploaded bytes: a NIfTI/NRRD file, or an .npz with array, spacing, origin, direction."""
    if fmt == "npz":
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            return image_from_array(z["array"], tuple(z["spacing"]), tuple(z["origin"]), z["direction"])
    suffix = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}.get(fmt)
    if suffix is None:
        raise ImageError(f"unknown format {fmt!r}; use nii.gz, nii, nrrd, mha or npz")
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(body)
        f.flush()
        check_file(f.name)
        try:
            return sitk.ReadImage(f.name)
        except RuntimeError:
            raise ImageError(f"the uploaded bytes are not a readable {fmt} image") from None


def create_app(
    model,
    memory=None,
    token: str | None = None,
    limits: ServerLimits | None = None,
    worker: ThreadPoolExecutor | None = None,
):
    """The FastAPI app. ``worker``: the single thread that runs all model work; pass the one that loaded the
    model (see ``model_thread``), so that no other thread ever starts a torch thread pool."""
    if FastAPI is None:
        raise RuntimeError("the server needs FastAPI and uvicorn: pip install 'MemorizingSAMLib[server]'")
    limits = limits or ServerLimits()
    app = FastAPI(title="MemorizingSAM inference server", version="1")
    sessions: OrderedDict[str, dict] = OrderedDict()
    lock = threading.RLock()  # guards the session table
    worker = worker or model_thread()
    device = str(next(model.parameters()).device)
    threads = worker.submit(torch.get_num_threads).result()  # as the model thread sees it: torch's is per thread

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in ("/health", "/openapi.json", "/docs"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limits.max_upload_bytes:
            await discard_body(request)
            return JSONResponse(
                {"detail": f"upload of {n} bytes exceeds the limit of {limits.max_upload_bytes}"}, status_code=413
            )
        return await call_next(request)

    def expire() -> None:
        now = time.monotonic()
        for sid in [s for s, v in sessions.items() if now - v["used"] > limits.idle_timeout_s]:
            del sessions[sid]

    def get(sid: str) -> dict:
        with lock:
            expire()
            if sid not in sessions:
                raise HTTPException(404, f"no session {sid!r} (expired or never created)")
            sessions.move_to_end(sid)
            sessions[sid]["used"] = time.monotonic()
            return sessions[sid]

    def segment_of(entry: dict, seg: int) -> int:
        if seg not in entry["session"].segments:
            raise HTTPException(404, f"no segment {seg} in this session")
        return seg

    def region_reply(entry, seg, region):
        s = entry["session"]
        return {
            "region": encode_region(s.mask(seg), region),
            "timing": s.last_timing,
            "placed": [prompt_to_json(p) for p in s.placed(seg)],
        }

    def run(fn):
        try:
            return worker.submit(fn).result()
        except (PromptError, ImageError, ValueError) as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info():
        return {
            "model": model.cfg.name,
            "device": device,
            "memory": memory is not None,
            "limits": asdict(limits),
            "sessions": len(sessions),
            "threads": threads,
            "cpu": capabilities().to_json(),
        }

    @app.post("/sessions")
    async def create(request: Request, format: str = "nii.gz"):
        body = bytearray()
        received = 0
        async for chunk in request.stream():  # no content-length (chunked): counted as it arrives
            received += len(chunk)
            if received > limits.max_upload_bytes + DRAIN_MAX_BYTES:
                break
            if received <= limits.max_upload_bytes:
                body += chunk
        if received > limits.max_upload_bytes:
            raise HTTPException(413, f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty body: send the volume's bytes")
        try:
            img = read_volume(bytes(body), format)
        except (ImageError, KeyError, ValueError, OSError) as e:
            raise HTTPException(400, f"cannot read the volume: {e}") from None
        voxels = int(np.prod(img.GetSize()))
        if voxels > limits.max_voxels:
            raise HTTPException(413, f"{voxels} voxels exceed the limit of {limits.max_voxels}")
        from .embedding_cache import EmbeddingCache

        session = InteractiveSession(
            model,
            SessionOptions(max_undo_bytes=limits.undo_bytes_per_segment),
            memory=memory,
            cache=EmbeddingCache(limits.cache_bytes_per_session),
        )
        run(lambda: session.set_image(img))
        sid = secrets.token_urlsafe(12)
        with lock:
            expire()
            while len(sessions) >= limits.max_sessions:
                sessions.popitem(last=False)  # least recently used
            sessions[sid] = {"session": session, "used": time.monotonic()}
        g = session.geometry
        return {
            "session": sid,
            "size": list(g.size),
            "spacing": list(g.spacing),
            "origin": list(g.origin_lps),
            "direction": list(g.direction_lps),
        }

    @app.post("/sessions/{sid}/segments")
    def add_segment(sid: str, name: str | None = None):
        e = get(sid)
        return {"segment": run(lambda: e["session"].add_segment(name))}

    @app.post("/sessions/{sid}/segments/{seg}/points")
    def add_point(sid: str, seg: int, body: dict = Body(...)):
        e = get(sid)
        segment_of(e, seg)
        if "ijk" not in body:
            raise HTTPException(422, "body needs 'ijk': [i, j, k]")
        region = run(lambda: e["session"].add_point(body["ijk"], bool(body.get("include", True)), seg))
        return region_reply(e, seg, region)

    @app.post("/sessions/{sid}/segments/{seg}/boxes")
    def add_box(sid: str, seg: int, body: dict = Body(...)):
        e = get(sid)
        segment_of(e, seg)
        if "ijk_min" not in body or "ijk_max" not in body:
            raise HTTPException(422, "body needs 'ijk_min' and 'ijk_max'")
        return region_reply(e, seg, run(lambda: e["session"].add_box(body["ijk_min"], body["ijk_max"], seg)))

    @app.post("/sessions/{sid}/segments/{seg}/prompts")
    def set_prompts(sid: str, seg: int, body: dict = Body(...)):
        e = get(sid)
        segment_of(e, seg)
        try:
            prompts = [prompt_from_json(p) for p in body["prompts"]]
        except (KeyError, TypeError, ValueError) as err:
            raise HTTPException(422, f"malformed prompts: {err}") from None
        return region_reply(e, seg, run(lambda: e["session"].set_prompts(prompts, seg)))

    for action in ("undo", "redo", "reset"):

        def handler(sid: str, seg: int, action=action):
            e = get(sid)
            segment_of(e, seg)
            return region_reply(e, seg, run(lambda: getattr(e["session"], action)(seg)))

        app.post(f"/sessions/{{sid}}/segments/{{seg}}/{action}")(handler)

    @app.delete("/sessions/{sid}")
    def delete(sid: str):
        get(sid)
        with lock:
            sessions.pop(sid, None)
        return {"deleted": sid}

    return app


def model_thread() -> ThreadPoolExecutor:
    """The one thread for all model work. torch's OpenMP thread pool belongs to the thread that calls it: work
    spread over the web framework's threads (or loading on one thread, serving on another) runs several pools on
    the same cores (measured here: 14-22 ms per click against 6 ms with a single thread)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="memsam-model")


def serve(
    model,
    host: str = "127.0.0.1",
    port: int = 8765,
    memory=None,
    token: str | None = None,
    limits: ServerLimits | None = None,
    worker: ThreadPoolExecutor | None = None,
) -> None:
    import uvicorn

    uvicorn.run(create_app(model, memory, token, limits, worker), host=host, port=port, log_level="warning")
