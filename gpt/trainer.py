"""The training loop: shuffled windows, AdamW, per-epoch validation. Observers do the reporting.

The loop knows nothing of MLflow: it trains, and calls `on_epoch_end` on its observers (minGPT's
callback shape). Its whole position (epoch, batch within the epoch, step, the losses of the epoch so
far) lives in a TrainState, so a checkpoint taken between any two steps, together with the RNG
states, resumes to exactly the same losses.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from gpt import metrics
from gpt.config import Config
from gpt.data import Corpus, Windows, epoch_order, sequential_batches
from gpt.device import autocast_dtype, fused_adamw, use_compile
from gpt.distributed import STOP_CHECK_STEPS, Ranks
from gpt.model import GPT
from gpt.state import TrainState

StepPoints = list[tuple[int, float]]  # (global step, training loss) of the steps that are logged


@dataclass
class EpochMetrics:
    """What one epoch measured: losses in nats, tokens, seconds (see gpt.metrics)."""
    epoch: int
    train_loss: float
    val_loss: float | None
    tokens_seen: int
    epoch_seconds: float
    wall_seconds: float
    tokens_per_second: float
    step_losses: StepPoints  # every log_every_steps, and the epoch's last step

    def as_metrics(self) -> dict[str, float]:
        """MLflow metric name (gpt.metrics) -> value, for step = epoch."""
        values = {
            metrics.TRAIN_LOSS: self.train_loss,
            metrics.TOKENS_SEEN: self.tokens_seen,
            metrics.EPOCH_SECONDS: self.epoch_seconds,
            metrics.WALL_SECONDS: self.wall_seconds,
            metrics.TOKENS_PER_SECOND: self.tokens_per_second,
        }
        if self.val_loss is not None:
            values[metrics.VAL_LOSS] = self.val_loss
            values[metrics.VAL_PPL] = math.exp(min(self.val_loss, 50.0))
        return values


class Observer(Protocol):
    """What the trainer calls after each epoch (gpt.reporting's Reporter and Checkpoints)."""

    def on_epoch_end(self, trainer: Trainer, measured: EpochMetrics) -> None:
        """Called after each epoch, validation included."""


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


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's parameters (with decay_groups: no decay on biases, norms, embeddings)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.decay_groups:  # weight decay on matrices only, not on biases, norms or embeddings
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
        keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        groups: Any = [{"params": decay, "weight_decay": t.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": t.weight_decay}]
    # fused AdamW runs the whole update as a few kernels instead of several per parameter
    return torch.optim.AdamW(groups, lr=t.lr, fused=fused_adamw(device))


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    """The epoch loop over a corpus's shuffled windows, with AdamW and per-epoch validation.

    fit() trains until train.epochs are done and calls each observer's on_epoch_end; it raises
    Interrupted (a stop was requested) or NonFiniteLoss. on_step, if set, sees every step.
    """
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
        self.dtype = autocast_dtype(cfg.train, device)
        compiled = use_compile(cfg.train, device)
        self.forward = torch.compile(self.model) if compiled else self.model
        # training steps go through DDP, which all-reduces the gradients during backward; validation
        # and sampling use the bare model (DDP would wait for the other ranks on every forward)
        self.step_forward = self.forward
        if self.ranks.active:
            device_ids = [device.index] if device.type == "cuda" else None
            ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            # compile the DDP module rather than wrap a compiled one: the compiler then splits the graph
            # at DDP's gradient buckets, so their all-reduces overlap the rest of the backward pass
            self.step_forward = torch.compile(ddp) if compiled else ddp
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
            measured = self.run_epoch()
            for observer in self.observers:
                observer.on_epoch_end(self, measured)
        return self.state

    def run_epoch(self) -> EpochMetrics:
        """Train the rest of the current epoch, validate when due, and return its metrics.

        Raises Interrupted between steps once a stop is requested (agreed by every rank), and
        NonFiniteLoss when a step's loss was NaN or infinite (found at the epoch's one host sync).
        """
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
        return self._end_epoch(epoch, values, first_step, started, tokens_before)

    def _end_epoch(
        self, epoch: int, values: list[float], first_step: int, started: float, tokens_before: int
    ) -> EpochMetrics:
        """The epoch's step losses checked (NonFiniteLoss), validation when due, the state moved to the
        epoch's end, and its metrics. values: every step's loss of the epoch, in order."""
        s, t = self.state, self.cfg.train
        step_losses = self._logged_points(values, first_step, len(values))
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
        measured = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            tokens_seen=s.tokens_seen,
            epoch_seconds=seconds,
            wall_seconds=s.wall_seconds,
            tokens_per_second=trained / seconds if seconds > 0 else 0.0,
            step_losses=step_losses,
        )
        s.history.append({"epoch": epoch, metrics.TRAIN_LOSS: train_loss, metrics.VAL_LOSS: val_loss, "step": s.step})
        return measured

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
