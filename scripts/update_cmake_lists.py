"""Rewrite the MEMSAM_LIB_SCRIPTS list in MemorizingSAM/CMakeLists.txt from the library's files (run after adding
a module; Testing/test_slicer_module.py fails when the list is stale)."""

import re
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cmake = root / "MemorizingSAM" / "CMakeLists.txt"
files = sorted(p.relative_to(root).as_posix() for p in (root / "MemorizingSAMLib").rglob("*.py"))
block = "set(MEMSAM_LIB_SCRIPTS\n" + "".join(f"  {f}\n" for f in files) + "  )"
cmake.write_text(re.sub(r"set\(MEMSAM_LIB_SCRIPTS\n.*?\n  \)", block, cmake.read_text(), flags=re.S))
print(f"{len(files)} library files listed")
