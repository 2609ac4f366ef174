"""CPU threads per process: a single run uses every core, N grid workers share them without oversubscribing.

Two threads contending for one core are worse than one: OpenMP's threads spin at every barrier waiting
for a thread that is not running, so a step can take several times as long. Each worker therefore gets
cores // N threads, in every thread pool it may start: torch's intra-op and inter-op pools, and the
OpenMP, MKL and OpenBLAS pools (numpy's OpenBLAS starts its own), which read their variables when
they load, before any code of ours runs in the worker.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets, Slurm), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Threads for each of `workers` processes sharing `cores` (default: available_cores()), at least 1."""
    return max(1, (cores or available_cores()) // max(1, workers))


@contextlib.contextmanager
def thread_environment(threads: int) -> Iterator[None]:
    """Set the OpenMP/MKL/OpenBLAS thread variables to `threads` inside the block, restoring them after.

    Processes spawned inside the block inherit them, so their thread pools start at that size when torch
    (or numpy) loads. This process's own pools are already running and keep their size.
    """
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def set_torch_threads(threads: int) -> None:
    """torch's intra-op and inter-op pools at `threads` each (a fresh process: before its first parallel op)."""
    import torch

    torch.set_num_threads(threads)
    # the inter-op size can be set once, before inter-op work starts; a process past that keeps its pool
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def thread_settings() -> dict[str, int | str | None]:
    """This process's thread pools and variables, e.g. to check what a worker was given."""
    import torch

    settings: dict[str, int | str | None] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    settings.update(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads())
    return settings
