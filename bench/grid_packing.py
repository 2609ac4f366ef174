"""Packing small grid cells onto one GPU: K cells at once against the same K cells one after another.

  python bench/grid_packing.py                                   # GPU 0, 4 cells of configs/tiny.yaml
  python bench/grid_packing.py --per-gpu 8 --steps 400 --set model.n_layers=4
  python bench/grid_packing.py --device cpu --per-gpu 2 --steps 4 --batch-size 8   # a quick check on a CPU

Each cell trains its own model (seed 0, 1, ...) over random tokens, in a spawned worker process set
up the way `ablate.py run --gpus 0 --per-gpu K` sets up its workers (gpt.ablation.workers.init_worker:
CUDA_VISIBLE_DEVICES pinned to the GPU, the CPU threads shared out). A cell first trains one
untimed warm-up epoch (CUDA context, allocator, torch.compile), then times one epoch of `steps`
optimizer steps.

  sequential  one worker trains the K cells in turn: tokens/s = all tokens / the sum of the timed epochs
  packed      K workers on the same GPU; after their warm-ups they start the timed epoch together (a
              barrier): tokens/s = all tokens / (last end - first start)

"wall" is end to end, worker start-up and warm-ups included. MLflow is left out: it costs the same
in both modes and runs beside training anyway.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt import config as config_module  # noqa: E402
from gpt.ablation.workers import gpu_slots, init_worker  # noqa: E402
from gpt.data import Corpus  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sizes import count_parameters  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_cell(config: str, overrides: list[str], steps: int, seed: int, barrier: Any) -> dict[str, Any]:
    """One cell in this worker: warm-up epoch, barrier, timed epoch (CLOCK_MONOTONIC: one clock for all processes)."""
    cfg = config_module.load(config, [*overrides, f"train.seed={seed}"])
    device = resolve_device(cfg.train.device)
    length, batch = cfg.window_length, cfg.train.batch_size
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (steps * batch * length + length + 2,), generator=generator)
    corpus = Corpus(train=tokens[: -(length + 1)], val=tokens[-(length + 1) :])
    torch.manual_seed(seed)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, device)
    started = time.monotonic()
    trainer.run_epoch()
    sync(device)
    warmup = time.monotonic() - started
    if barrier is not None:
        barrier.wait()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    trainer.run_epoch()
    sync(device)
    end = time.monotonic()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "tokens": steps * batch * length,
        "start": start,
        "end": end,
        "warmup": warmup,
        "peak": peak,
        "device": name,
        "threads": torch.get_num_threads(),
    }


def run_mode(args: argparse.Namespace, overrides: list[str], workers: int) -> dict[str, Any]:
    """Train args.per_gpu cells with `workers` worker processes (1: one after another; K: all at once)."""
    context = multiprocessing.get_context("spawn")
    queue = None
    if args.device != "cpu":
        queue = context.Queue()
        for slot in gpu_slots([args.gpu], workers, os.environ.get("CUDA_VISIBLE_DEVICES")):
            queue.put(slot)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with context.Manager() as manager:
        barrier = manager.Barrier(workers) if workers > 1 else None
        started = time.monotonic()
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=init_worker, initargs=(queue, threads)
        ) as pool:
            futures = [
                pool.submit(train_cell, args.config, overrides, args.steps, seed, barrier)
                for seed in range(args.per_gpu)
            ]
            cells = [future.result() for future in futures]
        wall = time.monotonic() - started
    tokens = sum(c["tokens"] for c in cells)
    if workers > 1:
        seconds = max(c["end"] for c in cells) - min(c["start"] for c in cells)
    else:
        seconds = sum(c["end"] - c["start"] for c in cells)
    per_cell = statistics.mean(c["tokens"] / (c["end"] - c["start"]) for c in cells)
    peak = max(c["peak"] for c in cells)
    warmup = statistics.mean(c["warmup"] for c in cells)
    return {"rate": tokens / seconds, "per_cell": per_cell, "wall": wall, "peak": peak, "warmup": warmup, **cells[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--per-gpu", type=int, default=4, help="cells packed onto the GPU (K)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in each cell's timed epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu", type=int, default=0, help="which visible GPU (as in --gpus)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both modes, alternating their order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [f"train.batch_size={args.batch_size}", f"train.device={args.device}", *args.overrides]
    cfg = config_module.load(args.config, overrides)
    modes = {"sequential": 1, "packed": args.per_gpu}
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_number in range(args.rounds):
        order = list(modes) if round_number % 2 == 0 else list(reversed(modes))  # drift hits both modes alike
        for mode in order:
            results[mode].append(run_mode(args, overrides, modes[mode]))
    first = results["sequential"][0]
    print(f"device: {first['device']}, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"cells: {args.per_gpu} x {Path(args.config).name} ({count_parameters(cfg.model) / 1e6:.1f}M parameters, "
        f"context {cfg.window_length}, batch {args.batch_size}), {args.steps} timed steps each, {args.rounds} round(s)"
    )
    header = ["mode".ljust(10), "workers", "threads", "tokens/s".rjust(12), "per cell".rjust(12), "wall s".rjust(8)]
    print(" ".join([*header, "warm-up s".rjust(10), "peak GiB".rjust(9)]))
    rates = {}
    for mode, workers in modes.items():
        runs = results[mode]
        rates[mode] = statistics.median(r["rate"] for r in runs)
        per_cell = statistics.median(r["per_cell"] for r in runs)
        wall, warmup = statistics.median(r["wall"] for r in runs), statistics.median(r["warmup"] for r in runs)
        peak = max(r["peak"] for r in runs)
        memory = f"{peak:9.2f}" if math.isfinite(peak) else f"{'-':>9s}"  # no GPU memory on a CPU
        threads = runs[0]["threads"]
        line = f"{mode:10s} {workers:7d} {threads:7d} {rates[mode]:12,.0f} {per_cell:12,.0f} {wall:8.1f} {warmup:10.1f}"
        print(f"{line} {memory}")
    print(f"packed / sequential aggregate tokens/s: {rates['packed'] / rates['sequential']:.2f}x")


if __name__ == "__main__":
    main()
