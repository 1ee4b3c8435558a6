"""Where the shipped default model, its memory bank and the sample data live.

In a source checkout (and an editable install) they are in the repository's Resources/ folder next to the
package; MEMSAM_RESOURCES points elsewhere (e.g. a Slicer extension's install tree).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "memsam_hq_geo.pt"
DEFAULT_BANK_NAME = "memsam_hq_geo.bank.msam"


def resources_dir() -> Path:
    env = os.environ.get("MEMSAM_RESOURCES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources"


def default_model_path() -> Path:
    p = resources_dir() / "models" / DEFAULT_MODEL_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no default model at {p}; pass --model CKPT (or set MEMSAM_RESOURCES)")
    return p


def default_bank_path() -> Path | None:
    p = resources_dir() / "models" / DEFAULT_BANK_NAME
    return p if p.is_file() else None


def sample_data_dir() -> Path:
    return resources_dir() / "SampleData"
