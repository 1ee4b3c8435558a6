import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "Data"


def pytest_configure(config):
    # Tests compare numbers across runs; two threads is what CI machines have.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def memsam():
    """Run the ``memsam`` command line as a real subprocess: memsam("info", path) -> CompletedProcess (text)."""

    def run(*args):
        cmd = [sys.executable, "-m", "MemorizingSAMLib.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True)

    return run
