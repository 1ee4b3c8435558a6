"""Start ``memsam`` under torchrun with one rank broken on purpose (for test_distributed.py): with
MEMSAM_TEST_BREAK=crash rank 1 raises when it draws its first sample, with =hang it stops answering (sleeps), as a
rank on a dead GPU or a stuck file system would. Every other rank runs the real command."""

import os
import sys
import time

from MemorizingSAMLib import cli
from MemorizingSAMLib.training import data

if os.environ.get("RANK") == "1":
    mode = os.environ["MEMSAM_TEST_BREAK"]

    def broken(self, rng):
        if mode == "crash":
            raise RuntimeError("rank 1 could not read its training data")
        time.sleep(3600)

    data.TrainingData.sample_target = broken

sys.exit(cli.main(sys.argv[1:]))
