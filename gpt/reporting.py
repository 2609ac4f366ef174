"""What a training run leaves behind as it goes: checkpoints, a progress bar, and per-epoch reports.

The trainer knows nothing of these: the Reporter is its observer, the ProgressBar its on_step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
from tqdm import tqdm

from gpt import checkpoint
from gpt.config import Config
from gpt.sampling import sample_text
from gpt.tracking import Tracker
from gpt.trainer import EpochMetrics, StepPoints, Trainer


class Checkpoints:
    """Writes last.pt and best.pt, at most every checkpoint_every_s, and always at the end.

    A 124M model's checkpoint with AdamW state is ~2 GB, so writing both every epoch of a short
    epoch would dominate the run. An improved best model is kept as an in-memory snapshot and
    written at the next checkpoint time instead.
    """

    def __init__(self, folder: Path, cfg: Config, run_id: str, every_s: float, extra: dict[str, Any]):
        self.folder, self.cfg, self.run_id, self.every_s, self.extra = folder, cfg, run_id, every_s, extra
        self.last_write = time.monotonic()
        self.best_payload: dict[str, Any] | None = None
        self.written = {path.name for path in folder.glob("*.pt")}  # a resumed run's earlier files count

    def payload(self, trainer: Trainer) -> dict[str, Any]:
        state = trainer.state
        return {
            "config": self.cfg.to_dict(),
            "model": checkpoint.model_state(trainer.model),
            "optimizer": trainer.optimizer.state_dict(),
            "state": state.to_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "best_val_loss": state.best_val_loss,
            "rng": checkpoint.rng_state(),
            "tokenizer": {"name": "gpt2"},
            "run_id": self.run_id,
            **self.extra,
        }

    def on_epoch(self, trainer: Trainer, improved: bool) -> None:
        if improved:
            self.best_payload = copy.deepcopy(self.payload(trainer))  # snapshot: training goes on mutating
        if time.monotonic() - self.last_write >= self.every_s:
            self.write(trainer)

    def write(self, trainer: Trainer, include_last: bool = True) -> None:
        if include_last:
            checkpoint.save(self.folder / "last.pt", self.payload(trainer))
            self.written.add("last.pt")
        if self.best_payload is not None:
            checkpoint.save(self.folder / "best.pt", self.best_payload)
            self.best_payload = None
            self.written.add("best.pt")
        self.last_write = time.monotonic()


class ProgressBar:
    """epoch, step, loss and tokens/s on a terminal. The loss lives on the device, so it is read
    (a host sync) at most once a second, not every step."""

    def __init__(self, tokens_per_step: int, enabled: bool):
        self.tokens_per_step, self.enabled = tokens_per_step, enabled
        self.bar: tqdm | None = None
        self.epoch, self.last_read, self.started = 0, 0.0, 0.0

    def __call__(self, epoch: int, done: int, total: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if epoch != self.epoch:
            self.close()
            self.bar = tqdm(total=total, initial=done - 1, desc=f"epoch {epoch}", unit="step", leave=False)
            self.epoch, self.started, self.first_done = epoch, now, done - 1
        self.bar.update(1)
        if now - self.last_read >= 1.0 or done == total:
            rate = (done - self.first_done) * self.tokens_per_step / max(now - self.started, 1e-9)
            self.bar.set_postfix_str(f"loss {float(loss):.3f}, {rate:,.0f} tokens/s")
            self.last_read = now
        if done == total:  # validation and the epoch's summary line come next
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Reporter:
    """The trainer's observer: metrics, samples, plot and checkpoints after each epoch.

    A resumed run re-trains from its checkpoint, which may be older than what the run has logged
    (checkpoints are throttled; a killed process logged epochs after its last one). Epoch metrics
    up to logged_epoch and step points up to logged_step are therefore not logged again: the
    re-trained values are the same, so the run's curves have every point exactly once.
    """

    def __init__(
        self,
        cfg: Config,
        tracker: Tracker,
        checkpoints: Checkpoints,
        encoding: tiktoken.Encoding,
        echo: Callable[[str], None],
        title: str,
        logged_epoch: int = 0,
        logged_step: int = 0,
    ):
        self.cfg, self.tracker, self.checkpoints = cfg, tracker, checkpoints
        self.encoding, self.echo, self.title = encoding, echo, title
        self.logged_epoch, self.logged_step = logged_epoch, logged_step
        self.seconds: dict[str, float] = {}  # wall time spent per reporting activity (metrics, samples, ...)

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        cfg, epochs = self.cfg, self.cfg.train.epochs
        improved = trainer.state.best_epoch == metrics.epoch
        points = []
        if metrics.epoch > self.logged_epoch:
            now = int(time.time() * 1000)
            points = [(k, float(v), metrics.epoch, now) for k, v in metrics.as_metrics().items()]
            self.logged_epoch = metrics.epoch
        self.log_steps(metrics.step_losses, points)
        self.tracker.log_loss_curve(trainer.state.history, self.title)
        if cfg.train.sample_every and (metrics.epoch % cfg.train.sample_every == 0 or metrics.epoch == epochs):
            self.tracker.log_text(self.samples(trainer, metrics.epoch), f"samples/epoch_{metrics.epoch:03d}.txt")
        self.checkpoints.on_epoch(trainer, improved)
        val = f"{metrics.val_loss:.3f}" if metrics.val_loss is not None else "-"
        self.echo(
            f"epoch {metrics.epoch}/{epochs}  train {metrics.train_loss:.3f}  val {val}  "
            f"{metrics.tokens_per_second:,.0f} tokens/s  {metrics.epoch_seconds:.1f} s"
        )

    def log_steps(self, step_losses: StepPoints, points: Sequence[tuple[str, float, int, int]] = ()) -> None:
        """Log the train_loss_step points after logged_step (with `points`, as one batch)."""
        now = int(time.time() * 1000)
        new = [("train_loss_step", loss, step, now) for step, loss in step_losses if step > self.logged_step]
        if new:
            self.logged_step = new[-1][2]
        self.tracker.log_points([*points, *new])

    def samples(self, trainer: Trainer, epoch: int) -> str:
        t = self.cfg.train
        generator = torch.Generator(device=trainer.device).manual_seed(t.seed + epoch)  # leaves training RNG alone
        lines = [f"epoch {epoch}, temperature {t.temperature}, top_k {t.top_k}", ""]
        for prompt in t.sample_prompts:
            text = sample_text(
                trainer.model,
                self.encoding,
                prompt,
                max_new_tokens=t.sample_tokens,
                temperature=t.temperature,
                top_k=t.top_k,
                generator=generator,
            )
            lines += [f"{prompt} -> {text}", ""]
        return "\n".join(lines)
