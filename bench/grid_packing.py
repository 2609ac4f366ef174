"""Grid cells in parallel worker processes against the same cells one after another, GPU or CPU.

  python bench/grid_packing.py                                   # GPU 0, 4 cells of configs/tiny.yaml
  python bench/grid_packing.py --per-gpu 8 --steps 400 --set model.n_layers=4
  python bench/grid_packing.py --device cpu                      # a CPU: 4 cells, --workers 1 and 2, today and now

Each cell trains its own model (seed 0, 1, ...) over random tokens, in a spawned worker process set
up the way `ablate.py run` sets up its workers (gpt.ablation.workers.worker_pool: cores // workers
threads in torch's pools and in OMP/MKL/OPENBLAS_NUM_THREADS before torch loads; with --gpus,
CUDA_VISIBLE_DEVICES pinned to the GPU). A cell first trains one untimed warm-up epoch (CUDA context,
allocator, torch.compile), then times one epoch of `steps` optimizer steps.

  sequential  one worker trains the cells in turn: tokens/s = all tokens / the sum of the timed epochs
  packed      K workers at once; after their warm-ups they start the timed epoch together (a barrier):
              tokens/s = all tokens / (last end - first start)

On a CPU the modes are `ablate.py run --workers 1` and `--workers 2`, each as it is now and as it was
before issue 18 ("today": a worker only set torch's intra-op threads, and trained with the full padded
logits and AdamW's loop, bench/baseline.py), plus "2 workers x all cores" to show what oversubscribing
costs. Modes alternate round by round. "wall" is end to end, worker start-up and warm-ups included.
MLflow is left out: it costs the same in every mode and runs beside training anyway.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baseline import todays_model, todays_optimizer, todays_worker_setup  # noqa: E402
from machine import describe, sync  # noqa: E402

from gpt import config as config_module  # noqa: E402
from gpt.ablation.workers import gpu_slots, worker_pool  # noqa: E402
from gpt.data import Corpus  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sizes import count_parameters  # noqa: E402
from gpt.threads import available_cores, thread_settings  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class Mode:
    workers: int
    today: bool = False  # before issue 18: intra-op threads only, full padded logits, AdamW's loop
    threads: int | None = None  # threads per worker against the rule (None: cores // workers)


def train_cell(config: str, overrides: list[str], steps: int, seed: int, barrier: Any, today: bool) -> dict[str, Any]:
    """One cell in this worker: warm-up epoch, barrier, timed epoch (CLOCK_MONOTONIC: one clock for all processes)."""
    cfg = config_module.load(config, [*overrides, f"train.seed={seed}"])
    device = resolve_device(cfg.train.device)
    length, batch = cfg.window_length, cfg.train.batch_size
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (steps * batch * length + length + 2,), generator=generator)
    corpus = Corpus(train=tokens[: -(length + 1)], val=tokens[-(length + 1) :])
    torch.manual_seed(seed)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, device)
    if today:
        todays_model(trainer.model)
        trainer.optimizer = todays_optimizer(trainer.optimizer)
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
        **thread_settings(),
    }


@contextlib.contextmanager
def pool_for(mode: Mode, queue: Any) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """The worker pool of `mode`: ablate.py's own, or one set up as before issue 18 or against the rule."""
    if not mode.today and mode.threads is None:
        with worker_pool(mode.workers, queue) as pool:
            yield pool
        return
    threads = mode.threads or max(1, (os.cpu_count() or 1) // mode.workers)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        mode.workers, mp_context=context, initializer=todays_worker_setup, initargs=(threads,)
    ) as pool:
        yield pool


def run_mode(args: argparse.Namespace, overrides: list[str], mode: Mode) -> dict[str, Any]:
    """Train args.cells cells with mode.workers worker processes (1: one after another; K: K at once)."""
    queue = None
    if args.device != "cpu":
        queue = multiprocessing.get_context("spawn").Queue()
        for slot in gpu_slots([args.gpu], mode.workers, os.environ.get("CUDA_VISIBLE_DEVICES")):
            queue.put(slot)
    with multiprocessing.get_context("spawn").Manager() as manager:
        barrier = manager.Barrier(mode.workers) if mode.workers > 1 else None
        started = time.monotonic()
        with pool_for(mode, queue) as pool:
            futures = [
                pool.submit(train_cell, args.config, overrides, args.steps, seed, barrier, mode.today)
                for seed in range(args.cells)
            ]
            cells = [future.result() for future in futures]
        wall = time.monotonic() - started
    tokens = sum(c["tokens"] for c in cells)
    if mode.workers > 1:
        seconds = max(c["end"] for c in cells) - min(c["start"] for c in cells)
    else:
        seconds = sum(c["end"] - c["start"] for c in cells)
    per_cell = statistics.mean(c["tokens"] / (c["end"] - c["start"]) for c in cells)
    peak = max(c["peak"] for c in cells)
    warmup = statistics.mean(c["warmup"] for c in cells)
    return {"rate": tokens / seconds, "per_cell": per_cell, "wall": wall, "peak": peak, "warmup": warmup, **cells[0]}


def modes_for(args: argparse.Namespace) -> dict[str, Mode]:
    if args.device != "cpu":
        return {"sequential": Mode(1), "packed": Mode(args.cells)}
    cores = available_cores()
    return {
        "today --workers 1": Mode(1, today=True),
        "now --workers 1": Mode(1),
        "today --workers 2": Mode(2, today=True),
        "now --workers 2": Mode(2),
        f"2 workers x {cores} threads": Mode(2, threads=cores),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--per-gpu", "--cells", dest="cells", type=int, default=4, help="cells (K packed on the GPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps in each cell's timed epoch (200 GPU, 10 CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu", type=int, default=0, help="which visible GPU (as in --gpus)")
    parser.add_argument("--rounds", type=int, help="repeat the modes, alternating their order (1 GPU, 2 CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.steps = args.steps or (10 if args.device == "cpu" else 200)
    args.rounds = args.rounds or (2 if args.device == "cpu" else 1)
    return args


def main() -> None:
    args = parse_args()
    overrides = [f"train.batch_size={args.batch_size}", f"train.device={args.device}", *args.overrides]
    cfg = config_module.load(args.config, overrides)
    modes = modes_for(args)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for round_number in range(args.rounds):
        order = list(modes) if round_number % 2 == 0 else list(reversed(modes))  # drift hits every mode alike
        for name in order:
            results[name].append(run_mode(args, overrides, modes[name]))
    print(describe(torch.device(args.device)))
    print(
        f"cells: {args.cells} x {Path(args.config).name} ({count_parameters(cfg.model) / 1e6:.1f}M parameters, "
        f"context {cfg.window_length}, batch {args.batch_size}), {args.steps} timed steps each, {args.rounds} round(s)"
    )
    print_table(modes, results)


def print_table(modes: dict[str, Mode], results: dict[str, list[dict[str, Any]]]) -> None:
    """Median aggregate tokens/s per mode (and its range over rounds), per cell, wall, warm-up, memory."""
    first = next(iter(modes))
    print(
        f"{'mode':26s} {'threads':>7s} {'tokens/s':>10s} {'range':>13s} {'vs ' + first:>22s} {'per cell':>9s} "
        f"{'wall s':>7s} {'warm-up s':>9s} {'peak GiB':>8s}"
    )
    base = statistics.median(r["rate"] for r in results[first])
    for name in modes:
        runs = results[name]
        rate = statistics.median(r["rate"] for r in runs)
        spread = f"{min(r['rate'] for r in runs):,.0f}-{max(r['rate'] for r in runs):,.0f}"
        per_cell = statistics.median(r["per_cell"] for r in runs)
        wall, warmup = statistics.median(r["wall"] for r in runs), statistics.median(r["warmup"] for r in runs)
        peak = max(r["peak"] for r in runs)
        memory = f"{peak:8.2f}" if math.isfinite(peak) else f"{'-':>8s}"  # no GPU memory on a CPU
        threads = f"{runs[0]['intra_op']}/{runs[0]['inter_op']}"
        print(
            f"{name:26s} {threads:>7s} {rate:10,.0f} {spread:>13s} {rate / base:21.2f}x {per_cell:9,.0f} "
            f"{wall:7.1f} {warmup:9.1f} {memory}"
        )
    print(
        "threads: a worker's torch intra-op/inter-op threads; OMP/MKL/OPENBLAS_NUM_THREADS:",
        "; ".join(f"{name}: {results[name][0]['OMP_NUM_THREADS']}" for name in modes),
    )


if __name__ == "__main__":
    main()
