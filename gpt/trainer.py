"""The training loop: shuffled windows, AdamW, per-epoch validation. Observers do the reporting.

The loop knows nothing of MLflow: it trains, and calls `on_epoch_end` on its observers (minGPT's
callback shape). Its whole position (epoch, batch within the epoch, step, the losses of the epoch so
far) lives in a TrainState, so a checkpoint taken between any two steps, together with the RNG
states, resumes to exactly the same losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from gpt.config import Config
from gpt.data import Corpus, Windows, epoch_order, sequential_batches
from gpt.distributed import STOP_CHECK_STEPS, Ranks
from gpt.errors import UserError
from gpt.model import GPT

StepPoints = list[tuple[int, float]]  # (global step, training loss) of the steps that are logged


@dataclass
class TrainState:
    epoch: int = 0  # finished epochs
    batch_in_epoch: int = 0  # batches of epoch+1 already done (non-zero only mid-epoch)
    step: int = 0  # optimizer steps so far
    tokens_seen: int = 0  # training target tokens so far
    wall_seconds: float = 0.0  # training + validation time so far, across resumes
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)  # losses of the batches done this epoch (mid-epoch)
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics, for plots

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # a deep copy: a checkpoint must not change as training goes on

    @classmethod
    def from_dict(cls, values: Any, source: str) -> TrainState:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict):
            raise UserError(f"{source}: the training state is a {type(values).__name__}, not a mapping")
        missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
        if missing or unknown:
            raise UserError(
                f"{source}: the training state is not from this version of the tool "
                f"(missing {', '.join(missing) or 'nothing'}; unknown {', '.join(unknown) or 'nothing'})"
            )
        return cls(**values)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float | None
    tokens_seen: int
    epoch_seconds: float
    wall_seconds: float
    tokens_per_second: float
    step_losses: StepPoints  # every log_every_steps, and the epoch's last step

    def as_metrics(self) -> dict[str, float]:
        values = {
            "train_loss": self.train_loss,
            "tokens_seen": self.tokens_seen,
            "epoch_seconds": self.epoch_seconds,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
        }
        if self.val_loss is not None:
            values["val_loss"] = self.val_loss
            values["val_ppl"] = math.exp(min(self.val_loss, 50.0))
        return values


class Observer(Protocol):
    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None: ...


class Interrupted(Exception):
    """Raised between steps after a stop was requested (Ctrl-C, SIGTERM).

    step_points: the logged steps of the unfinished epoch, which no epoch end will report.
    """

    def __init__(self, step_points: StepPoints):
        super().__init__("training was interrupted")
        self.step_points = step_points


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite; step_points are the epoch's logged steps before it."""

    def __init__(self, epoch: int, step: int, value: float, step_points: StepPoints):
        super().__init__(f"loss became {value} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.step_points = epoch, step, step_points


def resolve_device(requested: str, option: str = "train.device") -> torch.device:
    """auto | cuda | mps | cpu -> a device that exists here; `option` names the setting in errors."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if requested not in available:
        raise UserError(f"{option} must be one of auto, cuda, mps, cpu; got {requested!r}")
    if not available[requested]:
        what = "CUDA GPU" if requested == "cuda" else "MPS device"
        raise UserError(f"{option} is {requested} but no {what} is available; use --device auto or cpu")
    return torch.device(requested)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast by default on CUDA and on CPUs with bf16 matmul instructions; fp32 elsewhere.

    On a CPU with AVX-512 BF16 or AMX, bf16 matmuls run at about twice fp32's rate: the tiny config trains
    ~1.2x faster than in fp32, and a 3-epoch Alice run's per-epoch validation losses stay within 0.01% of
    fp32's, identical from run to run (bench/train_speed.py, README). Other CPUs and MPS keep fp32, where
    bf16 would be emulated and slower. train.precision bf16 or fp32 overrides the choice.
    """
    precision = cfg.train.precision
    if precision == "auto" and device.type == "cpu":
        cpu = torch.cpu
        native = [
            getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        ]
        return torch.bfloat16 if any(native) else None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.decay_groups:  # weight decay on matrices only, not on biases, norms or embeddings
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        groups: Any = [{"params": decay, "weight_decay": t.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": t.weight_decay}]
    # fused AdamW runs the whole update as one kernel per parameter instead of ~10 elementwise passes over
    # it: on a CPU that is ~5x faster for the tiny config's 3.2M parameters (bench/train_speed.py)
    return torch.optim.AdamW(groups, lr=t.lr, fused=device.type in ("cuda", "cpu"))


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: GPT,
        corpus: Corpus,
        device: torch.device,
        state: TrainState | None = None,
        ranks: Ranks | None = None,
    ):
        self.cfg, self.device, self.ranks = cfg, device, ranks or Ranks()
        self.model = model.to(device)
        self.optimizer = build_optimizer(cfg, self.model, device)
        self.state = state or TrainState()
        # the corpus is small next to the model: keep it on the device and cut windows there
        self.train_windows = Windows(corpus.train.to(device), cfg.window_length, cfg.window_stride)
        self.val_windows = Windows(corpus.val.to(device), cfg.window_length, cfg.window_length)
        self.dtype = autocast_dtype(cfg, device)
        use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        self.forward = torch.compile(self.model) if use_compile else self.model
        # training steps go through DDP, which all-reduces the gradients during backward; validation
        # and sampling use the bare model (DDP would wait for the other ranks on every forward)
        self.step_forward = self.forward
        if self.ranks.active:
            device_ids = [device.index] if device.type == "cuda" else None
            ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            # compile the DDP module rather than wrap a compiled one: the compiler then splits the graph
            # at DDP's gradient buckets, so their all-reduces overlap the rest of the backward pass
            self.step_forward = torch.compile(ddp) if use_compile else ddp
        self.stop_requested = False
        self.observers: list[Observer] = []
        # called after every step with (epoch, batches done, batches in epoch, this rank's loss on the device)
        self.on_step: Callable[[int, int, int, torch.Tensor], None] | None = None
        self.steps_per_epoch = len(self._batches(0))

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        t = self.cfg.train
        return epoch_order(len(self.train_windows), t.batch_size, t.drop_last, t.seed, epoch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fit(self) -> TrainState:
        """Train until cfg.train.epochs are done; raises Interrupted or NonFiniteLoss."""
        while self.state.epoch < self.cfg.train.epochs:
            metrics = self.run_epoch()
            for observer in self.observers:
                observer.on_epoch_end(self, metrics)
        return self.state

    def run_epoch(self) -> EpochMetrics:
        s, t = self.state, self.cfg.train
        epoch = s.epoch + 1
        total_steps = self.steps_per_epoch * t.epochs
        batches = [index.to(self.device) for index in self._batches(epoch)]  # one transfer, not one a step
        done = s.batch_in_epoch  # non-zero when resuming an interrupted epoch
        first_step = s.step - done + 1  # the global step of the epoch's first batch
        # every step's loss stays on the device until the epoch ends: no host sync per step. With
        # several ranks each holds its share of the batch mean; their sum is the batch's mean loss.
        losses = torch.zeros(len(batches), device=self.device)
        if self.ranks.is_main:  # the losses of the epoch's resumed part, counted once in the sum
            losses[:done] = torch.tensor(s.epoch_losses, dtype=losses.dtype)
        world = self.ranks.world_size
        started = time.perf_counter()
        tokens_before = s.tokens_seen
        self.model.train()
        for i in range(done, len(batches)):
            if self._stop_agreed(i - done):
                s.epoch_losses = self.ranks.sum(losses[:i]).tolist()
                s.wall_seconds += time.perf_counter() - started
                raise Interrupted(self._logged_points(s.epoch_losses, first_step, len(batches)))
            index, weight = self.ranks.shard(batches[i])
            inputs, targets = self.train_windows.batch(index)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.cfg, s.step, total_steps)
            loss = self.step(inputs, targets, weight)
            losses[i] = loss * (weight / world) if self.ranks.active else loss
            s.step += 1
            s.batch_in_epoch += 1
            s.tokens_seen += len(batches[i]) * targets.shape[1]
            if self.on_step is not None:
                self.on_step(epoch, i + 1, len(batches), loss)
        values = self.ranks.sum(losses).tolist()  # the epoch's one host sync
        step_losses = self._logged_points(values, first_step, len(batches))
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            before = [(step, value) for step, value in step_losses if step < first_step + bad]
            raise NonFiniteLoss(epoch, first_step + bad, values[bad], before)
        train_loss = math.fsum(values) / max(1, len(values))
        val_loss = self.evaluate() if epoch % t.eval_every == 0 or epoch == t.epochs else None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        s.epoch, s.batch_in_epoch, s.epoch_losses = epoch, 0, []
        s.wall_seconds += seconds
        if val_loss is not None and val_loss < s.best_val_loss:
            s.best_val_loss, s.best_epoch = val_loss, epoch
        trained = s.tokens_seen - tokens_before
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            tokens_seen=s.tokens_seen,
            epoch_seconds=seconds,
            wall_seconds=s.wall_seconds,
            tokens_per_second=trained / seconds if seconds > 0 else 0.0,
            step_losses=step_losses,
        )
        s.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "step": s.step})
        return metrics

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """One optimizer step on this rank's windows, its mean loss weighted for DDP's gradient average
        (see Ranks.shard); returns that (unweighted) mean loss, detached and still on the device."""
        with self._autocast():
            loss = self.step_forward(inputs, targets)
        (loss * weight if self.ranks.active else loss).backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _stop_agreed(self, steps_done: int) -> bool:
        """Whether to stop before the next step. Ranks stop together, at a step where they agree on it."""
        if not self.ranks.active:
            return self.stop_requested
        return steps_done % STOP_CHECK_STEPS == 0 and self.ranks.any(self.stop_requested, self.device)

    def _logged_points(self, values: list[float], first_step: int, n_batches: int) -> StepPoints:
        """The (step, loss) pairs logged as train_loss_step: every log_every_steps, and the epoch's last step."""
        every = self.cfg.train.log_every_steps
        return [
            (first_step + i, value)
            for i, value in enumerate(values)
            if (first_step + i) % every == 0 or i == n_batches - 1
        ]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over every validation window (all windows have the same length).

        With several ranks each scores its own contiguous share of the windows.
        """
        self.model.eval()
        total = torch.zeros((), device=self.device)
        share = self.ranks.part(len(self.val_windows))
        for index in sequential_batches(len(share), self.cfg.train.batch_size):
            inputs, targets = self.val_windows.batch((index + share.start).to(self.device))
            with self._autocast():
                total += self.forward(inputs, targets).float() * len(index)
        self.model.train()
        return float(self.ranks.sum(total)) / len(self.val_windows)
