"""Data-parallel runs under torchrun: the process group, which share of the work is this rank's, and gathering.

``torchrun --nproc_per_node N -m MemorizingSAMLib.cli train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in their environment; :func:`from_env` joins them into one process group (NCCL on
CUDA, gloo on CPU). Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op and the commands run as one
process. Collectives time out after ``timeout_s``, so a rank that hangs stops the job with an error instead of
blocking the others forever; a rank that fails is stopped by torchrun, which then stops the rest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank among ``world`` processes, and its GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> list[int]:
        """Indices of ``n`` work items that are this rank's: every world-th, starting at rank (balanced when items
        come sorted by size or by case)."""
        return list(range(self.rank, n, self.world))


def from_env(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join torchrun's process group if started by torchrun with more than one process; else a single rank.
    The backend follows the device: NCCL for CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
        )
    return Ranks(rank, world, local)


def device_for(ranks: Ranks, device: str | None) -> torch.device:
    """The device of this rank: the given one (a bare "cuda" becomes this rank's GPU), else its GPU if there is
    one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and ranks.active:
        return torch.device("cuda", ranks.local_rank)
    return d


def gather_to_main(obj, ranks: Ranks) -> list | None:
    """Every rank's ``obj`` (picklable) in rank order, on rank 0; None on the others. One process: [obj]."""
    if not ranks.active:
        return [obj]
    out = [None] * ranks.world if ranks.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def finish(ranks: Ranks) -> None:
    """Leave the process group (after a last barrier, so rank 0's writes are done before anyone exits)."""
    if ranks.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
