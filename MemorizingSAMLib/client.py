"""RemoteSession: the InteractiveSession calls, served by ``memsam serve`` over HTTP(S) (numpy and the standard
library only: no torch, SimpleITK only to read a file or a SimpleITK image).

It keeps a local copy of each segment's mask and applies the changed regions the server returns, so ``mask()``
costs no round trip. Coordinates as in InteractiveSession: (i, j, k) voxel indices of the volume.

What it does when things go wrong:

- HTTPS certificates are verified, against the system's store or ``ca_file``.
- A server that is saturated (503 with Retry-After) is waited for, up to ``busy_wait_s`` in all.
- A session the server does not know (404: the server was restarted, or a load balancer sent the request to
  another server because its own is gone), or a server that is gone (connection refused or reset, 502/504 from
  a proxy): the session is made again under the same id (``POST /sessions?session=ID``: a load balancer that
  routes by session id sends it to a live server), with the image the client kept, its segments, and each
  segment's prompts replayed in placement order; the masks come out as before (the model is deterministic),
  and the request that failed is sent again. Nothing is sent twice to a server that may have applied it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import ssl
import time
import urllib.parse

import numpy as np

from .prompts import Prompt, Region
from .wire import decode_region_into, prompt_from_json, prompt_to_json


class RemoteError(RuntimeError):
    """The server refused a request (the message is the server's), or gave no answer (``status`` 0)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None, gone: bool = False):
        super().__init__(f"server answered {status}: {detail}" if status else detail)
        self.status = status
        self.retry_after = retry_after
        self.gone = gone  # no server answered at all (refused, reset) or a proxy said its server is gone


class RemoteSession:
    """A SegmentationSession (protocol.py) whose model runs in ``memsam serve`` at ``url``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        ca_file: str | os.PathLike | None = None,
        busy_wait_s: float = 60.0,
        recover: bool = True,
    ):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must look like http://host:port or https://host:port, got {url!r}")
        self._parts = parts
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._conn: http.client.HTTPConnection | None = None
        self.token = token
        self.timeout = timeout
        self.busy_wait_s = busy_wait_s
        self.recover = recover
        self.sid: str | None = None
        self.size: tuple[int, int, int] | None = None
        self.masks: dict[int, np.ndarray] = {}
        self._placed: dict[int, tuple[Prompt, ...]] = {}
        self._names: dict[int, str | None] = {}
        self._server_seg: dict[int, int] = {}  # our segment id -> the server's (they differ after a recovery)
        self._payload: bytes | None = None  # the uploaded volume, kept to make the session again
        self.active: int | None = None
        self.recoveries = 0
        self.last_timing: dict = {}

    # -------------------------------------------------------------------------------------------- transport
    def _connection(self) -> http.client.HTTPConnection:
        # One persistent (keep-alive) connection: a new TCP connection per click costs milliseconds.
        if self._conn is None:
            if self._parts.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._parts.hostname, self._parts.port, timeout=self.timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(self._parts.hostname, self._parts.port, timeout=self.timeout)
        return self._conn

    def _send(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """One request, its JSON answer. Resent (once) only where that cannot apply it twice."""
        headers = {"Content-Type": content_type} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, self._parts.path + path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                break
            except ssl.SSLError as e:
                conn.close()
                self._conn = None
                raise RemoteError(0, f"{self.url}: TLS failed ({e.reason or e}): is the certificate trusted?") from None
            except (http.client.HTTPException, ConnectionError, OSError) as e:
                conn.close()
                self._conn = None
                # Sent again only where that cannot apply it twice: a GET or DELETE, or a kept-alive connection
                # that the server had closed before the request (it was never read). A timeout may mean the
                # server is still working on it: never resent.
                closed_before = reused and isinstance(
                    e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                )
                if attempt or not (method in ("GET", "DELETE") or closed_before):
                    gone = isinstance(e, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError))
                    raise RemoteError(0, f"no answer from {self.url} ({type(e).__name__}: {e})", gone=gone) from None
        if r.status >= 400:
            try:
                detail = json.loads(data).get("detail")
            except ValueError:
                detail = r.reason
            retry = r.getheader("Retry-After")
            raise RemoteError(
                r.status,
                str(detail),
                retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
                gone=r.status in (502, 504),
            )
        return json.loads(data)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """``_send``, waiting out a saturated server (503 + Retry-After) up to ``busy_wait_s``."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            try:
                return self._send(method, path, body, content_type)
            except RemoteError as e:
                if e.status != 503 or e.retry_after is None or time.monotonic() + e.retry_after > deadline:
                    raise
                time.sleep(e.retry_after)

    def _session_call(self, method: str, path, body: dict | None = None):
        """A request on the session (``path(sid, server_segment_of)``); a lost session is made again first."""
        payload = None if body is None else json.dumps(body).encode()
        try:
            return self._request(method, path(self._server_seg.get), payload)
        except RemoteError as e:
            lost = e.gone or (e.status == 404 and "no session" in str(e))
            if not (self.recover and lost and self._payload is not None):
                raise
        self._recover()
        return self._request(method, path(self._server_seg.get), payload)

    # --------------------------------------------------------------------------------------------- session
    def info(self) -> dict:
        return self._request("GET", "/info")

    def set_image(self, image, spacing=None, origin=None, direction=None) -> dict:
        """A path, a SimpleITK image or a [k, j, i] array (with spacing/origin/direction), uploaded once.
        SimpleITK is imported only for the first two: a viewer that passes arrays needs numpy alone."""
        if isinstance(image, (str, os.PathLike)):
            import SimpleITK as sitk

            image = sitk.ReadImage(str(image))
        buf = io.BytesIO()
        if hasattr(image, "GetSpacing"):  # a SimpleITK image
            import SimpleITK as sitk

            arr = sitk.GetArrayViewFromImage(image)
            spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
        else:
            arr = np.asarray(image)
        np.savez_compressed(
            buf,
            array=arr,
            spacing=np.asarray(spacing or (1, 1, 1), float),
            origin=np.asarray(origin or (0, 0, 0), float),
            direction=np.asarray(direction if direction is not None else np.eye(3), float).reshape(-1),
        )
        payload = buf.getvalue()
        # Checked before sending: hundreds of MB are not uploaded only to be refused.
        limit = self.info().get("limits", {}).get("max_upload_bytes")
        if limit is not None and len(payload) > limit:
            raise RemoteError(
                413,
                f"the volume is {len(payload)} bytes compressed, over the server's upload limit of {limit} bytes "
                "(memsam serve --max-upload-mb)",
            )
        if self.sid:
            self.close()
        sid = secrets.token_urlsafe(16)  # ours, so that a load balancer can route by it from the first request
        r = self._request("POST", f"/sessions?format=npz&session={sid}", payload, "application/octet-stream")
        self.sid, self.size, self._payload = r["session"], tuple(r["size"]), payload
        self.masks.clear()
        self._placed.clear()
        self._names.clear()
        self._server_seg.clear()
        return r

    def _recover(self) -> None:
        """Make the session again under its id, with its segments and their prompts, on whichever server now
        answers for it; the masks are rebuilt from the replies."""
        try:
            self._request("POST", f"/sessions?format=npz&session={self.sid}", self._payload, "application/octet-stream")
        except RemoteError as e:
            if e.status != 409:  # 409: it exists after all (the failure was in between): nothing to rebuild
                raise
            return
        self.recoveries += 1
        for seg in list(self.masks):
            q = f"?name={urllib.parse.quote(self._names[seg])}" if self._names.get(seg) else ""
            self._server_seg[seg] = self._request("POST", f"/sessions/{self.sid}/segments{q}", b"{}")["segment"]
            self.masks[seg][...] = 0
            if self._placed.get(seg):
                body = json.dumps({"prompts": [prompt_to_json(p) for p in self._placed[seg]]}).encode()
                r = self._request("POST", f"/sessions/{self.sid}/segments/{self._server_seg[seg]}/prompts", body)
                self._apply(seg, r)

    def add_segment(self, name: str | None = None) -> int:
        q = f"?name={urllib.parse.quote(name)}" if name else ""
        server_seg = self._session_call("POST", lambda s: f"/sessions/{self.sid}/segments{q}", {})["segment"]
        seg = max(self.masks, default=0) + 1 if server_seg in self.masks else server_seg
        self._server_seg[seg], self._names[seg] = server_seg, name
        self.masks[seg] = np.zeros(self.size[::-1], np.uint8)
        self.active = seg
        return seg

    def remove_segment(self, segment: int) -> None:
        """Forget a segment on the server and here."""
        self._session_call("DELETE", lambda s: f"/sessions/{self.sid}/segments/{s(segment, segment)}")
        for d in (self.masks, self._placed, self._names, self._server_seg):
            d.pop(segment, None)
        if self.active == segment:
            self.active = None

    def _apply(self, seg: int, reply: dict) -> Region | None:
        self.last_timing = reply.get("timing") or {}
        self._placed[seg] = tuple(prompt_from_json(p) for p in reply.get("placed", []))
        return decode_region_into(self.masks[seg], reply.get("region"))

    def _edit(self, segment: int | None, action: str, body: dict | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        if seg not in self.masks:
            raise RemoteError(404, f"no segment {seg} in this session")
        r = self._session_call("POST", lambda s: f"/sessions/{self.sid}/segments/{s(seg, seg)}/{action}", body or {})
        return self._apply(seg, r)

    def placed(self, segment: int | None = None) -> tuple[Prompt, ...]:
        """The segment's prompts in placement order, tags included, as the server's session holds them."""
        return self._placed.get(self.active if segment is None else segment, ())

    def add_point(self, ijk, include: bool = True, segment: int | None = None) -> Region | None:
        return self._edit(segment, "points", {"ijk": [float(v) for v in ijk], "include": bool(include)})

    def add_box(self, ijk_min, ijk_max, segment: int | None = None) -> Region | None:
        body = {"ijk_min": [float(v) for v in ijk_min], "ijk_max": [float(v) for v in ijk_max]}
        return self._edit(segment, "boxes", body)

    def set_prompts(self, prompts: list[Prompt], segment: int | None = None) -> Region | None:
        return self._edit(segment, "prompts", {"prompts": [prompt_to_json(p) for p in prompts]})

    def undo(self, segment: int | None = None) -> Region | None:
        return self._edit(segment, "undo")

    def redo(self, segment: int | None = None) -> Region | None:
        return self._edit(segment, "redo")

    def reset(self, segment: int | None = None) -> Region | None:
        return self._edit(segment, "reset")

    def mask(self, segment: int | None = None) -> np.ndarray:
        return self.masks[self.active if segment is None else segment]

    def close(self) -> None:
        if self.sid:
            try:
                self._request("DELETE", f"/sessions/{self.sid}")
            except RemoteError:
                pass
            self.sid = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
