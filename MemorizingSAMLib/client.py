"""RemoteSession: the InteractiveSession calls, served by ``memsam serve`` over HTTP (numpy and the standard
library only: no torch, SimpleITK only to read a file or a SimpleITK image).

It keeps a local copy of each segment's mask and applies the changed regions the server returns, so ``mask()``
costs no round trip. Coordinates as in InteractiveSession: (i, j, k) voxel indices of the volume.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import urllib.parse

import numpy as np

from .prompts import Prompt, Region
from .wire import decode_region_into, prompt_from_json, prompt_to_json


class RemoteError(RuntimeError):
    """The server refused a request (the message is the server's), or gave no answer (``status`` 0)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}" if status else detail)
        self.status = status


class RemoteSession:
    """A SegmentationSession (protocol.py) whose model runs in ``memsam serve`` at ``url``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must look like http://host:port, got {url!r}")
        self._parts = parts
        self._conn: http.client.HTTPConnection | None = None
        self.token = token
        self.timeout = timeout
        self.sid: str | None = None
        self.size: tuple[int, int, int] | None = None
        self.masks: dict[int, np.ndarray] = {}
        self._placed: dict[int, tuple[Prompt, ...]] = {}
        self.last_timing: dict = {}

    def _connection(self) -> http.client.HTTPConnection:
        # One persistent (keep-alive) connection: a new TCP connection per click costs milliseconds.
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        return self._conn

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
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
                    raise RemoteError(0, f"no answer from {self.url} ({type(e).__name__}: {e})") from None
        if r.status >= 400:
            try:
                detail = json.loads(data).get("detail")
            except ValueError:
                detail = r.reason
            raise RemoteError(r.status, str(detail))
        return json.loads(data)

    def _post(self, path: str, payload: dict | None = None):
        return self._request("POST", path, json.dumps(payload or {}).encode())

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
        r = self._request("POST", "/sessions?format=npz", payload, "application/octet-stream")
        self.sid, self.size = r["session"], tuple(r["size"])
        self.masks.clear()
        self._placed.clear()
        return r

    def add_segment(self, name: str | None = None) -> int:
        q = f"?name={urllib.parse.quote(name)}" if name else ""
        seg = self._request("POST", f"/sessions/{self.sid}/segments{q}", b"{}")["segment"]
        self.masks[seg] = np.zeros(self.size[::-1], np.uint8)
        self.active = seg
        return seg

    def remove_segment(self, segment: int) -> None:
        """Forget a segment on the server and here."""
        self._request("DELETE", f"/sessions/{self.sid}/segments/{segment}")
        self.masks.pop(segment, None)
        self._placed.pop(segment, None)
        if getattr(self, "active", None) == segment:
            self.active = None

    def _apply(self, seg: int, reply: dict) -> Region | None:
        self.last_timing = reply.get("timing") or {}
        self._placed[seg] = tuple(prompt_from_json(p) for p in reply.get("placed", []))
        return decode_region_into(self.masks[seg], reply.get("region"))

    def placed(self, segment: int | None = None) -> tuple[Prompt, ...]:
        """The segment's prompts in placement order, tags included, as the server's session holds them."""
        return self._placed.get(self.active if segment is None else segment, ())

    def add_point(self, ijk, include: bool = True, segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        r = self._post(
            f"/sessions/{self.sid}/segments/{seg}/points", {"ijk": [float(v) for v in ijk], "include": bool(include)}
        )
        return self._apply(seg, r)

    def add_box(self, ijk_min, ijk_max, segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        r = self._post(
            f"/sessions/{self.sid}/segments/{seg}/boxes",
            {"ijk_min": [float(v) for v in ijk_min], "ijk_max": [float(v) for v in ijk_max]},
        )
        return self._apply(seg, r)

    def set_prompts(self, prompts: list[Prompt], segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        body = {"prompts": [prompt_to_json(p) for p in prompts]}
        return self._apply(seg, self._post(f"/sessions/{self.sid}/segments/{seg}/prompts", body))

    def undo(self, segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        return self._apply(seg, self._post(f"/sessions/{self.sid}/segments/{seg}/undo"))

    def redo(self, segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        return self._apply(seg, self._post(f"/sessions/{self.sid}/segments/{seg}/redo"))

    def reset(self, segment: int | None = None) -> Region | None:
        seg = self.active if segment is None else segment
        return self._apply(seg, self._post(f"/sessions/{self.sid}/segments/{seg}/reset"))

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
