"""Training throughput: the project's default path against a plain reference, side by side.

Builds the model and the training step through the project's own code (gpt.model, gpt.trainer)
and times warm epochs of random tokens for four variants, interleaved round by round so that
drift in the machine's speed hits all of them alike:

  default       what train.py does on this device (CUDA: bf16 autocast, torch.compile, fused AdamW,
                SDPA, tokens on the device), with dropout as configured
  dropout0      the same with dropout 0 (like-for-like with nanoGPT's benchmark)
  chunked-loss  default with the fused, chunked LM head + cross-entropy (model.loss_chunk_rows)
  reference     the seed's style: fp32 eager, explicit triu-mask attention, plain AdamW

Peak memory is torch.cuda.max_memory_allocated over a timed epoch; on a CPU there is no such counter.

MFU is model FLOPs per token (6N + attention, gpt.sizes.flops_per_token) x tokens/s divided by the
matmul rate measured in this same process (bf16 on CUDA, fp32 on CPU).

  python bench/train_speed.py                 # GPU: seed config (configs/gpt2-128.yaml), batch 64
  python bench/train_speed.py --config configs/tiny.yaml --batch-size 16 --steps 5 --loss-chunk-rows 128  # CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt import config as config_module  # noqa: E402
from gpt.data import Corpus  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sizes import flops_per_token  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured FLOP/s of a square matmul: the ceiling MFU is computed against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(cfg: config_module.Config, device: torch.device, steps: int, reference: bool) -> Trainer:
    """A Trainer over random tokens: `steps` full batches per epoch and one validation window."""
    length, batch = cfg.window_length, cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (steps * batch * length + length + 2,), generator=generator)
    corpus = Corpus(train=tokens[: -(length + 1)], val=tokens[-(length + 1) :])
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, device)
    if reference:
        trainer.model.set_explicit_attention(True)
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=cfg.train.lr, foreach=False)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt2-128.yaml"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant, interleaved")
    parser.add_argument("--loss-chunk-rows", type=int, default=1024, help="model.loss_chunk_rows of chunked-loss")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = config_module.load(args.config, [f"train.batch_size={args.batch_size}", *args.overrides])
    device = resolve_device(base.train.device)
    on_cuda = device.type == "cuda"
    variants = {
        "default": [],
        "dropout0": ["model.dropout=0"],
        "chunked-loss": [f"model.loss_chunk_rows={args.loss_chunk_rows}"],
        "reference": ["train.precision=fp32", "train.compile=false"],
    }
    trainers = {}
    for name, overrides in variants.items():
        cfg = config_module.load(args.config, [f"train.batch_size={args.batch_size}", *args.overrides, *overrides])
        trainers[name] = make_trainer(cfg, device, args.steps, reference=name == "reference")
    warmup = {}
    for name, trainer in trainers.items():  # compile and allocator warm-up, timed separately
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.run_epoch()
        sync(device)
        warmup[name] = time.perf_counter() - started
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            started = time.perf_counter()
            metrics = trainer.run_epoch()
            sync(device)
            seconds = time.perf_counter() - started
            rates[name].append(args.steps * args.batch_size * base.window_length / seconds)
            del metrics
            if on_cuda:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    peak_rate = matmul_rate(device, torch.bfloat16 if on_cuda else torch.float32, 8192 if on_cuda else 1024)
    flops = flops_per_token(base.model, base.window_length)
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}, torch {torch.__version__}")
    print(f"config: {args.config} batch {args.batch_size}, context {base.window_length}, {flops / 6e6:.1f}M params")
    print(f"matmul rate measured here: {peak_rate / 1e12:.2f} TFLOP/s ({'bf16' if on_cuda else 'fp32'})")
    print(f"{'variant':12s} {'tokens/s':>12s} {'MFU':>7s} {'peak GiB':>9s} {'vs ref':>7s} {'warm-up s':>10s}")
    reference = statistics.median(rates["reference"])
    for name, values in rates.items():
        rate = statistics.median(values)
        mfu = rate * flops / peak_rate
        peak = f"{peaks[name]:.2f}" if name in peaks else "n/a"
        print(f"{name:12s} {rate:12,.0f} {mfu:7.1%} {peak:>9s} {rate / reference:6.2f}x {warmup[name]:10.1f}")


if __name__ == "__main__":
    main()
