"""Spreading a grid over machines and worker processes: shards of the cells, GPU slots, worker set-up."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

from gpt.ablation.grid import Cell
from gpt.errors import UserError
from gpt.threads import set_torch_threads, thread_environment, worker_threads


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """A deterministic share of the cells: by position in the (ordered, stable) cell list."""
    index, count = shard
    return [cell for position, cell in enumerate(cells) if position % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def gpu_slots(gpus: list[int], per_gpu: int, visible: str | None = None) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per worker: each GPU `per_gpu` times.

    GPU ids count within the GPUs this process may see: under Slurm or an outer
    CUDA_VISIBLE_DEVICES=3,5, `--gpus 0,1` means devices 3 and 5, never another job's device 0.
    """
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    slots = []
    for gpu in gpus:
        if devices is not None and not 0 <= gpu < len(devices):
            raise UserError(
                f"--gpus {gpu}: only {len(devices)} GPU(s) are visible (CUDA_VISIBLE_DEVICES={visible}); "
                f"ids count from 0 within them"
            )
        slots += [devices[gpu] if devices is not None else str(gpu)] * per_gpu
    return slots


def init_worker(gpu_queue: multiprocessing.Queue | None, threads: int) -> None:
    """Set up a spawned worker: its share of the CPU threads, and one GPU slot for its lifetime (if any).

    The worker was spawned inside gpt.threads.thread_environment(threads), so its OpenMP/MKL/OpenBLAS
    pools already have that size; torch's intra-op and inter-op pools are sized here. CUDA reads
    CUDA_VISIBLE_DEVICES when it first initializes, which no worker has done yet here.
    """
    set_torch_threads(threads)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get()


@contextlib.contextmanager
def worker_pool(
    workers: int,
    gpu_queue: multiprocessing.Queue | None = None,
    initializer: Callable[..., None] = init_worker,
    extra: tuple[Any, ...] = (),
) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """`workers` spawned processes that share the CPU: cores // workers threads each (gpt.threads).

    initializer(gpu_queue, threads, *extra) sets each worker up (default init_worker; it must call
    init_worker). Spawned, not forked: fork copies torch's running thread pools, which can deadlock.
    The thread variables are set for the whole block, so submit within it: the pool starts its
    processes as work is submitted, and they inherit the environment of that moment.
    """
    threads = worker_threads(workers)
    context = multiprocessing.get_context("spawn")
    with (
        thread_environment(threads),
        concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=initializer, initargs=(gpu_queue, threads, *extra)
        ) as pool,
    ):
        yield pool
