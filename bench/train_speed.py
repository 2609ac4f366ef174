"""Training throughput: the project's default path against today's and other variants, side by side.

Builds the model and the training step through the project's own code (gpt.model, gpt.trainer)
and times warm epochs of random tokens for each variant, interleaved round by round (in turned-around
order every other round) so that drift in a shared machine's speed hits all of them alike. Ratios are
taken within each round against the baseline variant; the table shows their median and range (the noise).

On a CPU (no arguments: configs/tiny.yaml, batch 16):
  today         the defaults before issue 18: fp32, full padded logits sliced, no chunking, AdamW's loop
  default       what train.py does now: chunked LM head + loss (model.loss_chunk_rows auto), fused AdamW,
                bf16 autocast where the CPU has AVX-512 BF16 or AMX (else fp32)
  fp32, bf16    default with train.precision fp32 / bf16
  full-logits   default with loss_chunk_rows=0 (full logits, the padded rows left out of the product)
  chunk-N       default with loss_chunk_rows=N
  loop-adamw    default with AdamW's per-parameter loop instead of the fused kernel
  compile       default with torch.compile (its compile time is in the warm-up column)
  reference     the seed's style: fp32 eager, explicit triu-mask attention, AdamW's loop, full logits
On CUDA (no arguments: configs/gpt2-128.yaml, batch 64): default (bf16 autocast, torch.compile, fused
AdamW), dropout0, chunked-loss (--loss-chunk-rows) and reference; ratios against reference.

Peak memory: CUDA's allocator peak over a timed epoch; on a CPU the peak resident set during the epoch
above the RSS before it (bench/machine.py). MFU is model FLOPs per token (6N + attention,
gpt.model.flops_per_token) x tokens/s over the matmul rate measured in this process between rounds,
in the variant's matmul dtype (bf16 where it autocasts, else fp32).

  python bench/train_speed.py                                      # a CPU: tiny config, ~1 minute
  python bench/train_speed.py --threads 1 --clock cpu              # a machine shared with other work
  python bench/train_speed.py --variants today,default,compile     # torch.compile: minutes of compiling
  python bench/train_speed.py --variants today,default,chunk-16,chunk-64 --rounds 7
  python bench/train_speed.py --config configs/tiny.yaml --set model.emb_dim=256 --set model.n_heads=4 \\
      --set model.n_layers=4 --set model.context_length=128 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baseline import todays_model, todays_optimizer  # noqa: E402
from machine import PeakMemory, describe, matmul_rate, sync  # noqa: E402

from gpt import config as config_module  # noqa: E402
from gpt.data import Corpus  # noqa: E402
from gpt.device import autocast_dtype, resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sizes import flops_per_token  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


def _today(trainer: Trainer) -> None:
    todays_model(trainer.model)
    trainer.optimizer = todays_optimizer(trainer.optimizer)


def _loop_adamw(trainer: Trainer) -> None:
    trainer.optimizer = todays_optimizer(trainer.optimizer)


def _reference(trainer: Trainer) -> None:
    _today(trainer)
    trainer.model.set_explicit_attention(True)


@dataclass
class Variant:
    overrides: list[str] = field(default_factory=list)
    adjust: Callable[[Trainer], None] | None = None  # changes the built Trainer (optimizer, model path)


CPU_VARIANTS = {
    "today": Variant(adjust=_today),
    "default": Variant(),
    "fp32": Variant(["train.precision=fp32"]),
    "bf16": Variant(["train.precision=bf16"]),
    "full-logits": Variant(["model.loss_chunk_rows=0"]),
    "chunk-16": Variant(["model.loss_chunk_rows=16"]),
    "chunk-64": Variant(["model.loss_chunk_rows=64"]),
    "chunk-128": Variant(["model.loss_chunk_rows=128"]),
    "loop-adamw": Variant(adjust=_loop_adamw),
    "compile": Variant(["train.compile=true"]),
    "reference": Variant(["train.precision=fp32", "train.compile=false"], _reference),
}
CPU_DEFAULT = "today,default,fp32,bf16,full-logits,loop-adamw"  # add compile with --variants (minutes of compiling)


def cuda_variants(loss_chunk_rows: int) -> dict[str, Variant]:
    return {
        "default": Variant(),
        "dropout0": Variant(["model.dropout=0"]),
        "chunked-loss": Variant([f"model.loss_chunk_rows={loss_chunk_rows}"]),
        "reference": Variant(["train.precision=fp32", "train.compile=false"], _reference),
    }


Batch = tuple[torch.Tensor, torch.Tensor]


def make_trainer(cfg: config_module.Config, device: torch.device, steps: int, variant: Variant) -> Trainer:
    """A Trainer over random tokens: `steps` full batches per epoch and one validation window."""
    length, batch = cfg.window_length, cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (steps * batch * length + length + 2,), generator=generator)
    corpus = Corpus(train=tokens[: -(length + 1)], val=tokens[-(length + 1) :])
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, device)
    if variant.adjust is not None:
        variant.adjust(trainer)
    return trainer


def epoch_batches(trainer: Trainer) -> list[Batch]:
    """The (inputs, targets) of one shuffled epoch, cut as run_epoch cuts them."""
    order = trainer._batches(1)  # noqa: SLF001 - the epoch's shuffled batches, as run_epoch draws them
    return [trainer.train_windows.batch(index.to(trainer.device)) for index in order]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_steps(trainer: Trainer, batches: list[Batch], device: torch.device, clock: str = "wall") -> float:
    """Seconds for one optimizer step (Trainer.step, as run_epoch takes it) on each batch.

    clock "cpu" is the process's CPU time: on a machine shared with other work, and with one thread (so
    no thread waits for another), it counts only the time this process ran, however busy the machine is.
    """
    now = CLOCKS[clock]
    sync(device)
    started = now()
    for inputs, targets in batches:
        trainer.step(inputs, targets)
    sync(device)
    return now() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="default: configs/tiny.yaml on a CPU, configs/gpt2-128.yaml on CUDA")
    parser.add_argument("--batch-size", type=int, help="default: 16 on a CPU, 64 on CUDA")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed sample")
    parser.add_argument("--rounds", type=int, help="timed samples per variant, interleaved (default: 15 CPU, 10 CUDA)")
    parser.add_argument(
        "--variants", help=f"comma-separated (CPU default: {CPU_DEFAULT}; all: {','.join(CPU_VARIANTS)})"
    )
    parser.add_argument(
        "--loss-chunk-rows", type=int, default=1024, help="model.loss_chunk_rows of CUDA's chunked-loss"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice, all cores)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: process CPU time (with --threads 1 on a busy machine)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args()


@dataclass
class Results:
    names: list[str]
    baseline: str
    tokens: int  # tokens per timed sample
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per sample, in round order
    warmup: dict[str, float] = field(default_factory=dict)  # first two steps: compile, allocator, lazy init
    memory: dict[str, float | None] = field(default_factory=dict)
    matmul: dict[str, list[float]] = field(default_factory=dict)  # FLOP/s by dtype, measured between rounds
    dtypes: dict[str, str] = field(default_factory=dict)  # each variant's matmul dtype (its autocast dtype)


def measure(args: argparse.Namespace, device: torch.device, config: str, common: list[str]) -> Results:
    on_cuda = device.type == "cuda"
    available = cuda_variants(args.loss_chunk_rows) if on_cuda else CPU_VARIANTS
    names = (args.variants or ",".join(available if on_cuda else CPU_DEFAULT.split(","))).split(",")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(available)}")
    baseline = "reference" if on_cuda else "today"
    trainers, batches = {}, []
    for name in names:
        cfg = config_module.load(config, [*common, *available[name].overrides])
        trainers[name] = make_trainer(cfg, device, args.steps + 2, available[name])
        batches = epoch_batches(trainers[name])  # the same tokens for every variant
    base = config_module.load(config, common)
    results = Results(
        names, baseline if baseline in names else names[0], args.steps * base.train.batch_size * base.window_length
    )
    results.warmup = {name: timed_steps(trainer, batches[:2], device) for name, trainer in trainers.items()}
    results.dtypes = {
        name: str(trainer.dtype or torch.float32).removeprefix("torch.") for name, trainer in trainers.items()
    }
    results.seconds = {name: [] for name in names}
    for round_number in range(args.rounds or (10 if on_cuda else 15)):
        for name in names if round_number % 2 == 0 else list(reversed(names)):
            with PeakMemory(device) as peak:
                results.seconds[name].append(timed_steps(trainers[name], batches[2:], device, args.clock))
            results.memory[name] = peak.extra_mib
        for dtype in set(results.dtypes.values()):
            rate = matmul_rate(device, getattr(torch, dtype), 8192 if on_cuda else 1024, clock=CLOCKS[args.clock])
            results.matmul.setdefault(dtype, []).append(rate)
    return results


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, option="--device")
    on_cuda = device.type == "cuda"
    config = args.config or str(ROOT / "configs" / ("gpt2-128.yaml" if on_cuda else "tiny.yaml"))
    batch = args.batch_size or (64 if on_cuda else 16)
    common = [f"train.batch_size={batch}", f"train.device={device.type}", *args.overrides]
    results = measure(args, device, config, common)
    base = config_module.load(config, common)
    flops = flops_per_token(base.model, base.window_length)
    print(describe(device))
    print(f"default precision here: {autocast_dtype(base.train, device) or torch.float32} (train.precision auto)")
    print(
        f"config: {Path(config).name} {' '.join(args.overrides)}; batch {batch}, context {base.window_length}, "
        f"{flops / 6e6:.1f}M params (non-embedding + head); {len(results.seconds[results.baseline])} rounds of "
        f"{args.steps} steps, {args.clock} clock"
    )
    size = 8192 if on_cuda else 1024
    for dtype, rates in sorted(results.matmul.items()):
        print(
            f"{dtype} matmul rate measured between rounds ({size}^3): median {statistics.median(rates) / 1e9:,.0f} "
            f"GFLOP/s, range {min(rates) / 1e9:,.0f}-{max(rates) / 1e9:,.0f}"
        )
    print_table(results, flops, "peak MiB" if on_cuda else "+RSS MiB")


def print_table(results: Results, flops: int, memory_label: str) -> None:
    """tokens/s (median), MFU (against the matmul rate of the variant's dtype), the median and quartiles
    of the per-round ratio to the baseline, memory."""
    baseline = results.baseline
    print(
        f"{'variant':12s} {'tokens/s':>10s} {'MFU':>6s} {'vs ' + baseline:>10s} {'ratio IQR':>11s} "
        f"{memory_label:>9s} {'warm-up s':>10s}"
    )
    for name in results.names:
        rate = results.tokens / statistics.median(results.seconds[name])
        ratios = [b / s for s, b in zip(results.seconds[name], results.seconds[baseline], strict=True)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        extra = results.memory.get(name)
        memory = f"{extra:9.0f}" if extra is not None else f"{'n/a':>9s}"
        peak_rate = statistics.median(results.matmul[results.dtypes[name]])
        print(
            f"{name:12s} {rate:10,.0f} {rate * flops / peak_rate:6.1%} {statistics.median(ratios):9.2f}x "
            f"{low:5.2f}-{high:<5.2f} {memory} {results.warmup[name]:10.1f}"
        )
    if "compile" in results.names and "default" in results.names:
        extra = results.warmup["compile"] - results.warmup["default"]
        saved = statistics.median(results.seconds["default"]) - statistics.median(results.seconds["compile"])
        payback = f"after {extra / saved * results.tokens:,.0f} tokens" if saved > 0 else "never (it is not faster)"
        print(f"torch.compile: {extra:.1f} s more warm-up than default; pays that back {payback}")


if __name__ == "__main__":
    main()
