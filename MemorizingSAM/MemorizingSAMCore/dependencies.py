"""What the module needs before it can load a model: a recent enough torch, and checkpoint downloads that are
complete and verified before anything uses them. Standard library only (runs before torch is there)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import urllib.request
from collections.abc import Callable

MIN_TORCH = (2, 4)
REQUIREMENTS = ("scipy",)  # numpy and SimpleITK ship with Slicer; torch comes from the PyTorch extension


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0)."""
    return tuple(int(v) for v in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_problem(version: str | None = None) -> str | None:
    """None if the installed torch (or ``version``) is usable, else what is wrong, in one line."""
    if version is None:
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return "PyTorch is not installed: install it with the PyTorch Utils module (PyTorch extension)"
    if version_tuple(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return f"MemorizingSAM needs PyTorch >= {need}, found {version}: update it in the PyTorch Utils module"
    return None


def missing_requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DownloadError(RuntimeError):
    pass


def download(
    url: str,
    path: str,
    sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` to ``path`` (run it off the GUI thread); returns the file's SHA256.

    The file appears at ``path`` only when complete: the bytes go to ``path + '.part'`` and are renamed after the
    length the server announced (and ``sha256`` when given) checked out. A partial file is never reused or kept;
    an existing complete ``path`` is reused only when it matches ``sha256`` (or when no hash is pinned).
    ``progress(bytes_so_far, total or None)`` is called as bytes arrive."""
    if os.path.isfile(path):
        digest = sha256_of(path)
        if sha256 is None or digest == sha256:
            return digest
        os.remove(path)  # a different file under that name: fetch the pinned one
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    h = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            while True:
                if cancelled is not None and cancelled():
                    raise DownloadError(f"download of {url} cancelled")
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if total is not None and done != total:
            raise DownloadError(f"download of {url} stopped at {done} of {total} bytes")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise DownloadError(f"{url}: SHA256 {digest} does not match the pinned {sha256}")
        os.replace(part, path)
        return digest
    except DownloadError:
        raise
    except Exception as e:  # http.client.IncompleteRead, URLError, OSError ...
        raise DownloadError(f"download of {url} failed after {done} bytes: {e}") from e
    finally:
        if os.path.exists(part):
            os.remove(part)
