"""Checks on an image file before SimpleITK reads it, for what SimpleITK lets through silently.

- gzip streams (.nii.gz, ...) are read to their end, so their CRC and length are checked (a truncated or damaged
  file otherwise loads with wrong voxels);
- NIfTI (.nii, .nii.gz): the voxel count the header declares must be in the file before anything is allocated (a
  381-byte file declaring 1000^3 voxels made SimpleITK allocate 1 GB), and NaN / inf voxels are counted, which
  ITK's NIfTI reader turns into 0 without a word.

One pass over the (decompressed) bytes, in chunks: no second copy of the volume.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 1 << 22
# NIfTI datatype codes -> numpy dtypes (the ones a float check or a size check needs).
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


class FileCheckError(ValueError):
    pass


class TooManyVoxels(FileCheckError):
    pass


@dataclass(frozen=True)
class NiftiHeader:
    dims: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * self.dtype.itemsize


def parse_nifti_header(head: bytes) -> NiftiHeader | None:
    """The fields of a NIfTI-1 or NIfTI-2 header that say how many voxel bytes follow, or None if not NIfTI."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dim = struct.unpack(order + "8h", head[40:56])
            code = struct.unpack(order + "h", head[70:72])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            n = dim[0]
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            code = struct.unpack(order + "h", head[12:14])[0]
            dim = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            n = dim[0]
            break
    else:
        return None
    if not 1 <= n <= 7 or any(d < 0 for d in dim[1 : n + 1]):
        raise FileCheckError(f"the NIfTI header's dimensions {dim[: n + 1]} are invalid")
    if code not in NIFTI_DTYPES:
        return NiftiHeader(tuple(dim[1 : n + 1]), np.dtype("u1"), max(offset, 352))  # sizes only roughly known
    return NiftiHeader(tuple(dim[1 : n + 1]), np.dtype(order + NIFTI_DTYPES[code]), max(offset, 352))


def _stream(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    return
                yield chunk
    except (OSError, EOFError, zlib.error) as e:
        if gz:
            raise FileCheckError(f"damaged gzip data ({e}): the file is truncated or corrupt") from None
        raise


def check_image_file(path: str | os.PathLike, max_voxels: int | None = None) -> None:
    """Raise :class:`FileCheckError` (naming the problem) for a damaged gzip stream, a NIfTI whose header declares
    more voxels than the file holds (or than ``max_voxels``: :class:`TooManyVoxels`, before the rest is
    decompressed), or NaN / inf voxels in a NIfTI; other files pass to SimpleITK as they are."""
    p = Path(path)
    name = p.name.lower()
    is_nifti = name.endswith(".nii") or name.endswith(".nii.gz")
    with open(p, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if not gz and not is_nifti:
        return
    header: NiftiHeader | None = None
    head = b""
    total = 0
    nonfinite = 0
    carry = b""
    for chunk in _stream(p):
        if is_nifti and header is None:
            head += chunk
            if len(head) < 540 and len(chunk) == CHUNK:
                continue
            header = parse_nifti_header(head)
            if header is None:
                is_nifti = False
            else:
                n = int(np.prod(header.dims, dtype=np.int64))
                if max_voxels is not None and n > max_voxels:
                    raise TooManyVoxels(f"the NIfTI header declares {n} voxels, more than the limit of {max_voxels}")
                declared = header.vox_offset + header.data_bytes
                if not gz and p.stat().st_size < declared:
                    raise FileCheckError(
                        f"the NIfTI header declares {header.dims} voxels ({declared} bytes) but the file holds "
                        f"{p.stat().st_size} bytes"
                    )
            chunk, total = head, 0
        total += len(chunk)
        if header is not None and header.dtype.kind == "f":
            # The voxels of this chunk (aligned to whole voxels, from vox_offset on, up to the declared end).
            start = max(0, header.vox_offset - (total - len(chunk)))
            data = carry + chunk[start:]
            usable = len(data) - len(data) % header.dtype.itemsize
            vox = np.frombuffer(data[:usable], dtype=header.dtype)
            nonfinite += int(np.count_nonzero(~np.isfinite(vox)))
            carry = data[usable:]
    if header is not None:
        declared = header.vox_offset + header.data_bytes
        if total < declared:
            raise FileCheckError(
                f"the NIfTI header declares {header.dims} voxels ({declared} bytes) but the data hold {total} bytes"
            )
        if nonfinite:
            raise FileCheckError(f"the image has {nonfinite} NaN or infinite voxels")
