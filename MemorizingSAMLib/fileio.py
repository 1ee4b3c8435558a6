"""Atomic file writes: a crash or an exception never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file in the target's folder, fsync it, then rename it over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; models and banks are meant to be shared
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def atomic_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


# Formats a 3D labelmap is written in (one file each: .mhd/.nhdr would write a second file beside it).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")


def image_suffix(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES) -> Path:
    """Refuse, before any work, an output the write would fail on or write wrongly: an unsupported format, a
    folder, or a folder that cannot be written. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give a file name")
    if suffixes is not None and not any(p.name.lower().endswith(s) for s in suffixes):
        raise ValueError(f"{p}: write a 3D image as one of {', '.join(suffixes)}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {p}: {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(f"cannot write {p}: the file is read-only")
    return p


def write_image(image, path: str | os.PathLike, compress: bool = True) -> Path:
    """``sitk.WriteImage`` through a temporary file in the same folder that is read back and compared (voxels and
    geometry) before it is renamed over ``path``: a write that fails part-way (disk full, a file-size limit, where
    ITK does not always report it) raises OSError and leaves any existing file as it was."""
    import numpy as np
    import SimpleITK as sitk

    p = check_output(path)
    suffix = image_suffix(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name[: -len(suffix)] + ".", suffix=suffix)
    os.close(fd)
    try:
        try:
            sitk.WriteImage(image, tmp, useCompression=compress)
            back = sitk.ReadImage(tmp)
        except RuntimeError as e:
            raise OSError(f"could not write {p}: {str(e).strip().splitlines()[-1]}") from None
        same = (
            back.GetSize() == image.GetSize()
            and np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
            and np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
            and np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
            and np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
        )
        if not same:
            raise OSError(f"could not write {p}: the written file does not read back as written (disk full?)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
