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

import asyncio
import io
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch

try:  # optional dependency (pip install MemorizingSAMLib[server]); imported here so FastAPI can resolve annotations
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
except ImportError:  # pragma: no cover - reported by create_app
    FastAPI = None

from .capabilities import capabilities
from .geometry import ImageError, ImageTooLarge, check_file, image_from_array, validate_image
from .prompts import Prompt
from .server_models import (
    BoxIn,
    ClickOut,
    DeletedOut,
    HealthOut,
    InfoOut,
    PointIn,
    PromptIn,
    PromptsIn,
    SegmentOut,
    SessionOut,
    validation_message,
)
from .session import InteractiveSession, PromptError, SessionOptions
from .users import Authenticator
from .wire import encode_region, prompt_to_json

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
    max_voxels: int = 1024**3  # checked from the file's header, before the voxels are decoded
    max_json_bytes: int = 2**20  # a request body other than an upload
    max_prompts_per_request: int = 256  # set_prompts: each new prompt is a decode on the shared model thread
    max_prompts_per_segment: int = 2048
    header_timeout_s: float = 10.0  # request line and headers must arrive within this
    body_timeout_s: float = 300.0  # an upload must arrive within this
    max_connections: int = 256  # beyond: 503 at once (uvicorn's limit_concurrency)
    max_sessions: int = 16  # in all; never reached by evicting another user's session
    max_sessions_per_user: int = 4  # a user's own least recently used session goes when they open one more
    max_wait_s: float = 10.0  # a request that would queue longer for the model thread gets 503 + Retry-After
    idle_timeout_s: float = 3600.0
    cache_bytes_per_session: int = 256 * 2**20
    undo_bytes_per_segment: int = 64 * 2**20  # SessionOptions.max_undo_bytes of the server's sessions


NPZ_DTYPES = {np.dtype(t) for t in ("u1", "i1", "u2", "i2", "u4", "i4", "f4", "f8")}


def _npz_member(z: zipfile.ZipFile, name: str, max_voxels: int | None = None) -> np.ndarray:
    """One array of an .npz, its shape and dtype read from the header before anything is decompressed."""
    try:
        info = z.getinfo(name + ".npy")
    except KeyError:
        raise ImageError(f"the npz has no '{name}' array") from None
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype not in NPZ_DTYPES:
            raise ImageError(f"'{name}' has dtype {dtype}; send integers, float32 or float64")
        n = int(np.prod(shape, dtype=np.int64))
        if max_voxels is not None and n > max_voxels:
            raise ImageTooLarge(f"{n} voxels exceed the limit of {max_voxels}")
        data = f.read(n * dtype.itemsize + 1)
    if len(data) != n * dtype.itemsize:
        raise ImageError(f"'{name}' holds {len(data)} bytes for a {shape} {dtype} array")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _vector(z: zipfile.ZipFile, name: str, n: int) -> tuple[float, ...]:
    v = _npz_member(z, name).astype(np.float64).reshape(-1)
    if v.size != n or not np.all(np.isfinite(v)):
        raise ImageError(f"'{name}' must be {n} finite numbers, got {v.tolist()}")
    return tuple(float(x) for x in v)


def read_volume(body: bytes, fmt: str, max_voxels: int | None = None, tmp_dir: str | None = None) -> sitk.Image:
    """A volume from uploaded bytes: a NIfTI/NRRD/MHA file, or an .npz with array, spacing, origin, direction.

    Everything is checked before the voxels are decoded: dtypes and shapes (npz headers), the voxel count the
    file declares (``max_voxels``, ImageTooLarge), damaged gzip data, NaN / inf voxels; then the geometry."""
    if fmt == "npz":
        try:
            with zipfile.ZipFile(io.BytesIO(body)) as z:
                arr = _npz_member(z, "array", max_voxels)
                spacing, origin = _vector(z, "spacing", 3), _vector(z, "origin", 3)
                direction = _vector(z, "direction", 9)
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"not a readable npz ({e})") from None
        if arr.ndim != 3:
            raise ImageError(f"'array' must be 3D [k, j, i], got shape {arr.shape}")
        if any(s <= 0 for s in spacing):
            raise ImageError(f"spacing must be positive, got {spacing}")
        img = image_from_array(arr, spacing, origin, direction)
        validate_image(img)
        return img
    suffix = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}.get(fmt)
    if suffix is None:
        raise ImageError(f"unknown format {fmt!r}; use nii.gz, nii, nrrd, mha or npz")
    with tempfile.NamedTemporaryFile(suffix=suffix, dir=tmp_dir) as f:
        f.write(body)
        f.flush()
        check_file(f.name, max_voxels)
        reader = sitk.ImageFileReader()
        reader.SetFileName(f.name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ImageError(f"the uploaded bytes are not a readable {fmt} image") from None
        n = int(np.prod(reader.GetSize(), dtype=np.int64))
        if max_voxels is not None and n > max_voxels:
            raise ImageTooLarge(f"{n} voxels exceed the limit of {max_voxels}")
        try:
            img = reader.Execute()
        except RuntimeError:
            raise ImageError(f"the uploaded bytes are not a readable {fmt} image") from None
    validate_image(img)
    return img


TMP_PREFIX = "memsam-serve-"


def private_tmp_dir() -> str:
    """This server's folder for uploads being decoded (a temporary file per upload, removed when read); folders
    left by servers that were killed (their process is gone) are removed first."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if name.startswith(TMP_PREFIX):
            pid = name[len(TMP_PREFIX) :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prompt(p: PromptIn) -> Prompt:
    return Prompt(
        tuple(float(v) for v in p.ijk), p.include, tuple(float(v) for v in p.box_hi) if p.box_hi else None, p.tag
    )


SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


@dataclass
class ModelLoad:
    """How busy the model thread is: requests waiting or running, and the mean service time of recent ones
    (an exponential moving average, seconds)."""

    pending: int = 0
    service_s: float = 0.0
    served: int = 0

    def record(self, seconds: float) -> None:
        self.served += 1
        self.service_s = seconds if self.served == 1 else 0.8 * self.service_s + 0.2 * seconds

    @property
    def expected_wait_s(self) -> float:
        return self.pending * self.service_s


def create_app(
    model,
    memory=None,
    token: str | None = None,
    limits: ServerLimits | None = None,
    worker: ThreadPoolExecutor | None = None,
    auth: Authenticator | None = None,
):
    """The FastAPI app. ``worker``: the single thread that runs all model work; pass the one that loaded the
    model (see ``model_thread``), so that no other thread ever starts a torch thread pool.

    Who may call: ``auth`` (a users file, users.py), or one shared ``token``, or anyone (loopback use). Each
    session belongs to the user who made it: another user's session id is answered 404, as an unknown one."""
    if FastAPI is None:
        raise RuntimeError("the server needs FastAPI and uvicorn: pip install 'MemorizingSAMLib[server]'")
    limits = limits or ServerLimits()
    if auth is None and token is not None:
        auth = Authenticator(token=token)
    load = ModelLoad()
    app = FastAPI(title="MemorizingSAM inference server", version="1")
    sessions: OrderedDict[str, dict] = OrderedDict()
    lock = threading.RLock()  # guards the session table
    worker = worker or model_thread()
    device = str(next(model.parameters()).device)
    threads = worker.submit(torch.get_num_threads).result()  # as the model thread sees it: torch's is per thread

    tmp_dir = private_tmp_dir()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # Without a users file there is one user (anyone, or whoever holds the shared token): no quota below
        # the server's own limit.
        request.state.user, request.state.quota = "anonymous", limits.max_sessions
        if auth is not None and request.url.path not in ("/health", "/openapi.json", "/docs"):
            user = auth.user_for(request.headers.get("authorization", ""))
            if user is None:
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
            request.state.user = user.name
            if auth.path is not None:
                request.state.quota = user.max_sessions or limits.max_sessions_per_user
        n = request.headers.get("content-length")
        upload = request.url.path == "/sessions" and request.method == "POST"
        if not upload and n is not None and n.isdigit() and int(n) > limits.max_json_bytes:
            await discard_body(request)
            return JSONResponse(
                {"detail": f"request body of {n} bytes exceeds the limit of {limits.max_json_bytes}"}, status_code=413
            )
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

    def get(sid: str, request: Request) -> dict:
        with lock:
            expire()
            if sid not in sessions or sessions[sid]["user"] != request.state.user:
                raise HTTPException(404, f"no session {sid!r} (expired or never created)")
            sessions.move_to_end(sid)
            sessions[sid]["used"] = time.monotonic()
            return sessions[sid]

    def segment_of(entry: dict, seg: int) -> int:
        if seg not in entry["session"].segments:
            raise HTTPException(404, f"no segment {seg} in this session")
        return seg

    def room(entry, seg, n: int) -> None:
        if len(entry["session"].placed(seg)) + n > limits.max_prompts_per_segment:
            raise HTTPException(422, f"segment {seg} has the most prompts allowed ({limits.max_prompts_per_segment})")

    def region_reply(entry, seg, region):
        s = entry["session"]
        return {
            "region": encode_region(s.mask(seg), region),
            "timing": s.last_timing,
            "placed": [prompt_to_json(p) for p in s.placed(seg)],
        }

    def run(fn):
        """``fn()`` on the model thread; 503 with Retry-After when it would wait longer than max_wait_s."""
        with lock:
            wait = load.expected_wait_s
            if limits.max_wait_s and load.pending and wait > limits.max_wait_s:
                raise HTTPException(
                    503,
                    f"the server is saturated: {load.pending} requests ahead, about {wait:.1f} s of model work",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
            load.pending += 1

        def timed():
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                dt = time.perf_counter() - t0
                with lock:
                    load.record(dt)

        try:
            return worker.submit(timed).result()
        except (PromptError, ImageError, ValueError) as e:
            raise HTTPException(422, str(e)) from None
        finally:
            with lock:
                load.pending -= 1

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    @app.get("/health", response_model=HealthOut)
    def health():
        return {"status": "ok"}

    @app.get("/info", response_model=InfoOut)
    def info():
        return {
            "model": model.cfg.name,
            "device": device,
            "memory": memory is not None,
            "limits": asdict(limits),
            "sessions": len(sessions),
            "queue": load.pending,
            "service_ms": round(load.service_s * 1e3, 2),
            "threads": threads,
            "cpu": capabilities().to_json(),
        }

    upload_body = {
        "requestBody": {
            "required": True,
            "description": "the volume: a NIfTI / NRRD / MHA file's bytes, or an .npz with array [k, j, i], spacing, "
            "origin and direction (LPS)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }

    @app.post("/sessions", response_model=SessionOut, openapi_extra=upload_body)
    async def create(request: Request, format: str = "nii.gz", session: str | None = None):
        if session is not None and not SESSION_ID.match(session):
            raise HTTPException(422, "'session' must be 16-64 letters, digits, '-' or '_'")
        with lock:
            if session is not None and session in sessions:
                raise HTTPException(409, f"session {session!r} exists already")
        body = bytearray()
        received = 0

        async def read() -> None:
            nonlocal received
            async for chunk in request.stream():  # no content-length (chunked): counted as it arrives
                received += len(chunk)
                if received > limits.max_upload_bytes + DRAIN_MAX_BYTES:
                    break
                if received <= limits.max_upload_bytes:
                    body.extend(chunk)

        try:
            await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the upload did not arrive within {limits.body_timeout_s:g} s") from None
        if received > limits.max_upload_bytes:
            raise HTTPException(413, f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty body: send the volume's bytes")
        try:
            # Decoding is CPU work: off the event loop, so /health and the other sessions' requests go on.
            img = await run_in_threadpool(read_volume, bytes(body), format, limits.max_voxels, tmp_dir)
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except (ImageError, KeyError, ValueError, OSError) as e:
            raise HTTPException(400, f"cannot read the volume: {e}") from None
        body.clear()  # the upload is decoded: its bytes go before the session is made
        from .embedding_cache import EmbeddingCache

        sess = InteractiveSession(
            model,
            SessionOptions(max_undo_bytes=limits.undo_bytes_per_segment),
            memory=memory,
            cache=EmbeddingCache(limits.cache_bytes_per_session),
        )
        run(lambda: sess.set_image(img))
        # The caller may name the session (a load balancer routes by the id, so the client must know it first).
        sid = session or secrets.token_urlsafe(16)
        user = request.state.user
        with lock:
            expire()
            if sid in sessions:
                raise HTTPException(409, f"session {sid!r} exists already")
            mine = [k for k, v in sessions.items() if v["user"] == user]  # least recently used first
            while len(mine) >= request.state.quota:
                del sessions[mine.pop(0)]  # the user's own oldest session makes room, never someone else's
            if len(sessions) >= limits.max_sessions:
                raise HTTPException(
                    503,
                    f"the server holds its maximum of {limits.max_sessions} sessions",
                    headers={"Retry-After": "30"},
                )
            sessions[sid] = {"session": sess, "used": time.monotonic(), "user": user}
        g = sess.geometry
        return {
            "session": sid,
            "size": list(g.size),
            "spacing": list(g.spacing),
            "origin": list(g.origin_lps),
            "direction": list(g.direction_lps),
        }

    @app.post("/sessions/{sid}/segments", response_model=SegmentOut)
    def add_segment(request: Request, sid: str, name: str | None = None):
        e = get(sid, request)
        return {"segment": run(lambda: e["session"].add_segment(name))}

    @app.post("/sessions/{sid}/segments/{seg}/points", response_model=ClickOut)
    def add_point(request: Request, sid: str, seg: int, body: PointIn):
        e = get(sid, request)
        segment_of(e, seg)
        ijk, include = [float(v) for v in body.ijk], body.include
        room(e, seg, 1)
        region = run(lambda: e["session"].add_point(ijk, include, seg))
        return region_reply(e, seg, region)

    @app.post("/sessions/{sid}/segments/{seg}/boxes", response_model=ClickOut)
    def add_box(request: Request, sid: str, seg: int, body: BoxIn):
        e = get(sid, request)
        segment_of(e, seg)
        lo, hi = [float(v) for v in body.ijk_min], [float(v) for v in body.ijk_max]
        room(e, seg, 1)
        return region_reply(e, seg, run(lambda: e["session"].add_box(lo, hi, seg)))

    @app.post("/sessions/{sid}/segments/{seg}/prompts", response_model=ClickOut)
    def set_prompts(request: Request, sid: str, seg: int, body: PromptsIn):
        e = get(sid, request)
        segment_of(e, seg)
        if len(body.prompts) > limits.max_prompts_per_segment:
            raise HTTPException(
                422, f"{len(body.prompts)} prompts exceed the limit of {limits.max_prompts_per_segment}"
            )
        prompts = [_prompt(p) for p in body.prompts]
        placed = e["session"].placed(seg)
        same = next((i for i, (a, b) in enumerate(zip(placed, prompts)) if a != b), min(len(placed), len(prompts)))
        if len(prompts) - same > limits.max_prompts_per_request:
            raise HTTPException(
                422,
                f"{len(prompts) - same} new prompts in one request exceed the limit of "
                f"{limits.max_prompts_per_request} (each is a decode on the shared model thread)",
            )
        return region_reply(e, seg, run(lambda: e["session"].set_prompts(prompts, seg)))

    for action in ("undo", "redo", "reset"):

        def handler(request: Request, sid: str, seg: int, action=action):
            e = get(sid, request)
            segment_of(e, seg)
            return region_reply(e, seg, run(lambda: getattr(e["session"], action)(seg)))

        app.post(f"/sessions/{{sid}}/segments/{{seg}}/{action}", response_model=ClickOut)(handler)

    @app.delete("/sessions/{sid}/segments/{seg}", response_model=SegmentOut)
    def remove_segment(request: Request, sid: str, seg: int):
        e = get(sid, request)
        segment_of(e, seg)
        run(lambda: e["session"].remove_segment(seg))
        return {"segment": seg}

    @app.delete("/sessions/{sid}", response_model=DeletedOut)
    def delete(request: Request, sid: str):
        get(sid, request)
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
    auth: Authenticator | None = None,
    tls: tuple[str, str] | None = None,
) -> None:
    """Run the app with uvicorn; ``tls`` = (certificate, key) PEM files for HTTPS. Access logs stay off: no
    request line (session ids) or header (tokens) is ever logged."""
    import uvicorn

    limits = limits or ServerLimits()
    ssl = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    uvicorn.run(
        BodyLimit(create_app(model, memory, token, limits, worker, auth), limits.max_json_bytes),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=header_timeout_protocol(limits.header_timeout_s),
        limit_concurrency=limits.max_connections,
        **ssl,
    )


class BodyLimit:
    """ASGI wrapper: a request body other than an upload (``POST /sessions``) larger than ``limit`` bytes gets a
    413, also when it comes chunked without a Content-Length (the app is told the client left, and its answer
    is replaced)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] == "/sessions"):
            await self.app(scope, receive, send)
            return
        total, over = 0, False

        async def limited():
            nonlocal total, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not over:
                raise  # (over the limit, the app fails on the disconnect it was told of: its error is not the answer)
        if over:
            reply = JSONResponse({"detail": f"request body exceeds the limit of {self.limit} bytes"}, status_code=413)
            await reply(scope, receive, send)


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not arrived ``seconds``
    after it opened or after its last response (uvicorn waits for them forever: 300 slow-loris connections
    stayed open). Idle keep-alive connections are closed by uvicorn itself."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch = None
            self._arm()

        def _arm(self) -> None:
            if self._watch is None:
                self._watch = self.loop.call_later(seconds, self._expire, self.cycle)

        def _expire(self, cycle) -> None:
            self._watch = None
            if self.cycle is cycle and not self.transport.is_closing():  # no request began since it was armed
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            between = self.cycle is None or self.cycle.response_complete
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = None
            elif between:
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            super().connection_lost(exc)

    return HeaderTimeoutH11
