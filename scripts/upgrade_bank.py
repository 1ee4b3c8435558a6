"""Rewrite a memory bank of an earlier version with this version's integrity data: per-entry CRC32s of keys and
values and a fingerprint of every weight (it had a sampled one). The arrays are copied unchanged, and only after the
bank's old fingerprint was checked against the model.

    .venv/bin/python scripts/upgrade_bank.py Resources/models/memsam_hq_clicks.bank.msam \\
        Resources/models/memsam_hq_clicks.pt
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.memory_bank import FINGERPRINT_FULL, MemoryBank, write_bank


class _Entry:
    def __init__(self, d: dict) -> None:
        self.d = d

    def to_json(self) -> dict:
        return self.d


def main(bank_path: str, model_path: str) -> None:
    model = load_model(model_path)
    bank = MemoryBank.load(bank_path, model)  # checks the old fingerprint
    if bank.fingerprint_kind == FINGERPRINT_FULL and bank.row_crc32 is not None:
        print(f"{bank_path}: already current")
        return
    with open(bank_path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(16)[8:])
        header = json.loads(f.read(hlen))["header"]
    fg = None if bank.foreground is None else np.asarray(bank.foreground)
    write_bank(
        bank_path,
        model,
        bank.layer,
        np.asarray(bank.descriptors.numpy(), dtype=np.float16),
        np.asarray(bank.keys),
        np.asarray(bank.values),
        [_Entry(e) for e in bank.entries],
        header.get("extra"),
        fg,
    )
    again = MemoryBank.load(bank_path, model)
    assert again.fingerprint_kind == FINGERPRINT_FULL and again.row_crc32 is not None
    print(f"{bank_path}: rewritten with per-entry CRCs and a full fingerprint ({Path(bank_path).stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
