"""How long a run will take on this device, said before it starts.

A training step costs the model's matmuls (forward, and twice that backward: the 6N FLOPs per token of
gpt.sizes.flops_per_token), the softmax cross-entropy over the vocabulary, and the AdamW update of every
parameter. Each is timed here once, at the model's own shapes, on as much of the batch as a small FLOP
budget allows, and scaled to the batch, the epoch and the run; validation adds a forward pass over its windows.
Timing the model's own shapes matters: small models run far below a device's peak FLOP rate (the tiny
config reaches ~10% of a CPU's matmul rate, the reference config ~50%), which one peak figure would hide.
This takes ~0.5 s on a CPU. Once training runs, the progress line's ETA comes from the measured rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt.config import Config
from gpt.device import autocast_dtype
from gpt.model import padded_vocab
from gpt.sizes import DataStats, count_parameters

FLOP_BUDGET = {"cpu": 250_000_000, "mps": 5_000_000_000, "cuda": 50_000_000_000}  # per timed matmul
MIN_ROWS = 32  # tokens of the smallest timed matmul
LOSS_ROWS = 128  # tokens of the timed loss
MIN_SECONDS = 0.02  # each operation is timed for at least this long
ADAMW_SLICE = 1 << 22  # parameters the timed AdamW step updates; scaled to the model's
SLOW_RUN_S = 3600.0  # a CPU run longer than this gets the advice of a smaller config


@dataclass(frozen=True)
class Estimate:
    """Seconds a run's training takes on one device: per step, per epoch (validation included), in all."""

    step_seconds: float
    validation_seconds: float  # one pass over the validation windows
    steps_per_epoch: int
    epochs: int
    left: bool = False  # epochs counts those a resumed run has left

    @property
    def epoch_seconds(self) -> float:
        """One epoch: its steps and its validation."""
        return self.steps_per_epoch * self.step_seconds + self.validation_seconds

    @property
    def run_seconds(self) -> float:
        """Every epoch of the run."""
        return self.epochs * self.epoch_seconds


def _timed(operation: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes: the median of at least 3 calls (and MIN_SECONDS), after one to warm up. The
    median, as a loaded machine preempts some calls for whole scheduler slices."""
    operation()
    _sync(device)
    times: list[float] = []
    while len(times) < 3 or sum(times) < MIN_SECONDS:
        started = time.perf_counter()
        operation()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _matmul_seconds(rows: int, inner: int, outer: int, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per row of a (rows, inner) @ (inner, outer) product on the device, timed on as many of the
    rows as FLOP_BUDGET allows (at least MIN_ROWS): small products run far slower per FLOP than big ones."""
    flops_per_row = 2 * inner * outer
    timed_rows = min(rows, max(MIN_ROWS, FLOP_BUDGET.get(device.type, FLOP_BUDGET["cuda"]) // flops_per_row))
    a = torch.randn(timed_rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, outer, device=device, dtype=dtype)
    return _timed(lambda: a @ b, device) / timed_rows


def _forward_matmul_seconds(cfg: Config, rows: int, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per token of the forward matmuls of a batch of `rows` tokens: per layer Q/K/V, the output
    projection, the MLP's two, and attention's scores and weighted sum over the window; then the LM head."""
    d, length = cfg.model.emb_dim, cfg.window_length
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, length), (length, d)]
    layer = sum(_matmul_seconds(rows, inner, outer, device, dtype) for inner, outer in shapes)
    return cfg.model.n_layers * layer + _matmul_seconds(rows, d, padded_vocab(cfg.model.vocab_size), device, dtype)


def _cross_entropy_seconds(cfg: Config, rows: int, device: torch.device) -> float:
    """The loss over the vocabulary of `rows` tokens, forward and backward (fp32, as the model computes it)."""
    logits = torch.randn(rows, cfg.model.vocab_size, device=device, requires_grad=True)
    targets = torch.randint(cfg.model.vocab_size, (rows,), device=device)
    return _timed(lambda: F.cross_entropy(logits, targets).backward(), device)


def _adamw_seconds(n_params: int, device: torch.device) -> float:
    """One AdamW update of n_params parameters: its arithmetic on a slice, scaled (it is memory-bound).
    Written out rather than torch.optim.AdamW, whose first step imports for seconds."""
    size = min(n_params, ADAMW_SLICE)
    param, grad, mean, square = (torch.rand(size, device=device) for _ in range(4))

    def update() -> None:
        mean.lerp_(grad, 0.1)
        square.mul_(0.999).addcmul_(grad, grad, value=0.001)
        param.mul_(1 - 1e-5).addcdiv_(mean, square.sqrt().add_(1e-8), value=-1e-4)

    return _timed(update, device) * n_params / size


def estimate(cfg: Config, stats: DataStats, device: torch.device, world_size: int = 1) -> Estimate:
    """Time the model's operations briefly on `device` and scale them to the run (see the module docstring);
    with world_size processes each trains its share of every batch."""
    batch_rows = -(-cfg.train.batch_size // world_size) * cfg.window_length
    dtype = autocast_dtype(cfg.train, device) or torch.float32
    rows = min(batch_rows, LOSS_ROWS)
    # a resumed trainer's RNG states are already restored: the timing's random tensors must not move them
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():
            forward = _forward_matmul_seconds(cfg, batch_rows, device, dtype)  # per token
        loss = _cross_entropy_seconds(cfg, rows, device) / rows
        step = (3 * forward + loss) * batch_rows + _adamw_seconds(count_parameters(cfg.model), device)
    validation = (forward + loss / 3) * stats.val_windows * cfg.window_length / world_size
    return Estimate(step, validation, stats.steps_per_epoch, cfg.train.epochs)


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 3.5 h, 9 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def describe_estimate(found: Estimate, device: torch.device, n_params: int) -> list[str]:
    """The lines printed at a run's start: the estimate, and on a CPU run of hours, what suits a CPU."""
    lines = [
        f"estimate: ~{duration(found.epoch_seconds)} per epoch, ~{duration(found.run_seconds)} for "
        f"{found.epochs} epoch{'s' * (found.epochs != 1)}{' left' if found.left else ''} on {device.type} "
        "(timed on this machine; the progress line updates it)"
    ]
    if device.type == "cpu" and found.run_seconds > SLOW_RUN_S:
        lines.append(
            f"note: this {n_params / 1e6:,.0f}M-parameter model takes ~{duration(found.run_seconds)} on this CPU; "
            "configs/tiny.yaml trains on a CPU in minutes (--config configs/tiny.yaml), or use a GPU"
        )
    return lines
