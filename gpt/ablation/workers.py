"""Spreading a grid over machines and worker processes: shards of the cells, GPU slots, worker set-up."""

from __future__ import annotations

import multiprocessing
import os

from gpt.ablation.grid import Cell
from gpt.errors import UserError


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

    CUDA reads CUDA_VISIBLE_DEVICES when it first initializes, which no worker has done yet here.
    """
    import torch

    torch.set_num_threads(threads)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get()
