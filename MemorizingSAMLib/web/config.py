"""What ``memsam web`` serves: the model choice, the files it may open, and where it listens.

Torch-free and trame-free, so that the CLI can check its arguments before starting anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
EXPORT_FORMATS = (".nii.gz", ".nrrd", ".seg.nrrd")


@dataclass(frozen=True)
class WebConfig:
    """``model`` None: the shipped default with its bank (``memory`` another bank, ``use_memory`` False none).
    ``server_url``: clicks run on a ``memsam serve`` instead (``token`` and ``ca_file`` as for RemoteSession).
    ``data_dirs``: folders on this machine whose volumes the page may open, beside the shipped samples; nothing
    else on the disk can be opened from the browser."""

    model: str | None = None
    memory: str | None = None
    use_memory: bool = True
    device: str = "cpu"
    threads: int | None = None  # torch's CPU threads for the clicks (None: one core fewer than the machine has)
    server_url: str | None = None
    token: str | None = None
    ca_file: str | None = None
    data_dirs: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_mb: int = 1024
    volume_rendering: bool = False
    title: str = "MemorizingSAM"


@dataclass(frozen=True)
class Volume:
    """A volume the page offers: a shipped sample or a file in one of the data folders."""

    key: str
    label: str
    path: str


def samples(sample_dir: Path) -> list[Volume]:
    """The shipped samples, described by their dataset.json (one click away on the page)."""
    index = sample_dir / "dataset.json"
    if not index.is_file():
        return []
    meta = json.loads(index.read_text())
    out = []
    for case in meta.get("cases", []):
        path = sample_dir / case["image"]
        if path.is_file():
            names = ", ".join(sorted(case.get("labels", {}).values()))
            source = meta.get("sources", {}).get(case.get("source", ""), {}).get("name", case.get("source", ""))
            out.append(Volume(f"sample:{case['id']}", f"{case['id']} ({names}; {source})", str(path)))
    return out


def is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES) and not name.lower().endswith(".seg.nrrd")


def data_files(data_dirs: tuple[str, ...], limit: int = 500) -> list[Volume]:
    """Volume files under the data folders (recursively, sorted, at most ``limit``)."""
    out: list[Volume] = []
    for root in data_dirs:
        base = Path(root).resolve()
        if not base.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        for p in sorted(base.rglob("*")):
            if p.is_file() and is_volume_file(p.name):
                out.append(Volume(f"file:{p}", str(p.relative_to(base.parent)), str(p)))
                if len(out) >= limit:
                    return out
    return out


COMPANION_SUFFIXES = (".raw", ".raw.gz", ".zraw", ".img", ".img.gz")  # data files of .nhdr / .mhd headers


def safe_upload_name(name: str, companion: bool = False) -> str:
    """A browser's file name reduced to a plain name in the upload folder (no folders, no '..'). ``companion``:
    a header's data file is accepted too."""
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .")
    ok = bool(base) and (is_volume_file(base) or (companion and base.lower().endswith(COMPANION_SUFFIXES)))
    if not ok:
        raise ValueError(f"{name!r} is not a volume file ({', '.join(VOLUME_SUFFIXES)})")
    return base


def export_name(volume_name: str, fmt: str) -> str:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    stem = volume_name
    for suffix in VOLUME_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "volume"
    return f"{stem}_segments{fmt}"
