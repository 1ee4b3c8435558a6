import os
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
