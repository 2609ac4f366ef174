"""Data-parallel training across the processes `torchrun` starts (NCCL on GPUs, gloo on CPU).

`torchrun --nproc_per_node=N train.py ...` runs N copies of train.py; each learns its rank from the
environment. Every rank draws the same shuffled global batch (the order is seeded by seed and epoch),
trains on its own slice of it, and DistributedDataParallel averages the gradients, so N ranks take the
same optimizer steps as one process with the same global batch (train.batch_size). Rank 0 alone
talks to MLflow and writes checkpoints; a checkpoint holds no per-rank state, so a run resumes with
any number of ranks.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gpt.errors import UserError

# How often (in steps) the ranks agree on whether to stop: each agreement is a collective and a host
# sync, and a Ctrl-C that waits a few steps costs nothing.
STOP_CHECK_STEPS = 8


@dataclass(frozen=True)
class Ranks:
    """Which process this is among those training one run; the defaults are a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, tracks and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether several processes train this run."""
        return self.world_size > 1

    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous slice of a global batch, and the weight of its mean loss.

        DDP averages gradients over ranks; weighting each rank's mean by (its windows x ranks / batch
        windows) makes that average the gradient of the global batch's mean loss, also for a last
        batch that does not split evenly. A rank left without a window (a last batch smaller than the
        number of ranks) still runs a step, on one window with weight 0, because every rank must take
        part in every gradient all-reduce.
        """
        if not self.active:
            return index, 1.0
        part = index.tensor_split(self.world_size)[self.rank]
        if len(part) == 0:
            return index[:1], 0.0
        return part, len(part) * self.world_size / len(index)

    def part(self, count: int) -> range:
        """This rank's contiguous share of `count` items (validation windows); the first count % ranks
        shares hold one item more, as tensor_split cuts a batch in shard()."""
        size, extra = divmod(count, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over all ranks (the tensor itself in one process)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item())


def from_environment(environ: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; one process without them."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {world_size} (they are set by torchrun)")
    return Ranks(rank, world_size, local_rank)


def join(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group of a torchrun launch; returns the device this rank trains on."""
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)  # NCCL warns about a group left open at exit
    return device


def leave() -> None:
    """Destroy the process group, after freeing the DistributedDataParallel wrappers that use it.

    A trainer can sit in reference cycles (callbacks that refer back to it), so its DDP wrapper can
    outlive it until the garbage collector runs. Freed after the group is destroyed (at interpreter
    exit), the wrapper ends in std::terminate: the rank dies of SIGABRT after a finished run (about 1
    exit in 10 with gloo on CPU) and torchrun fails the launch. Collecting first frees it in time.
    An error left uncaught (--debug) is kept in sys.last_traceback, whose frames hold the trainer: by
    the time atexit runs its traceback is printed, so their locals are cleared first.
    """
    uncaught = getattr(sys, "last_traceback", None)
    if uncaught is not None:
        traceback.clear_frames(uncaught)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_rank(ranks: Ranks, seed: int, step: int) -> None:
    """Give each rank but rank 0 its own dropout stream: equal masks on every rank would correlate them.

    Rank 0 keeps the stream a checkpoint restores, so one process reproduces a single-process run.
    """
    if ranks.rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, ranks.rank, step]).generate_state(1)[0]))
