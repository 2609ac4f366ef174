"""What a training run leaves behind as it goes: checkpoints, a progress bar, and per-epoch reports.

The trainer knows nothing of these: the Reporter and the Checkpoints are its observers, the
ProgressBar its on_step; gpt.tracked_run wires them together.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tiktoken
import torch
from tqdm import tqdm

from gpt import checkpoint, metrics
from gpt.config import Config
from gpt.estimate import duration
from gpt.sampling import sample_text
from gpt.tracking import Tracker
from gpt.trainer import EpochMetrics, StepPoints, Trainer

METRICS_EVERY_S = 1.0  # metric points are spooled (an fsync, ~1-5 ms) at most this often
PLOT_EVERY_S = 10.0  # the loss curve is redrawn at most this often (~0.1 s of the sender's CPU and the GIL)
SAMPLE_SHARE = 0.05  # samples that take at most this share of an epoch are not throttled by time
PROGRESS_LINE_EVERY_S = 30.0  # a progress line this often in output that is not a terminal (a log file)


@contextlib.contextmanager
def timed(seconds: dict[str, float], activity: str) -> Iterator[None]:
    """Add the block's wall time to seconds[activity] (perf_counter: ~100 ns, cheap enough for every epoch)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[activity] = seconds.get(activity, 0.0) + time.perf_counter() - started


def snapshot(value: Any, memo: dict[tuple, torch.Tensor] | None = None) -> Any:
    """A copy of a checkpoint payload that training cannot change: tensors cloned (on their device),
    containers rebuilt. copy.deepcopy does the same at ~75 us a tensor, ~50 ms for the reference model and
    its AdamW state: as long as a GPU epoch. Views of the same memory (tied weights: state_dict gives
    the embedding and the head as two tensor objects over one storage) stay one tensor."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        view = (
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
        if view not in memo:
            memo[view] = value.detach().clone()
        return memo[view]
    if isinstance(value, dict):
        return {key: snapshot(item, memo) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(snapshot(item, memo) for item in value)
    return copy.deepcopy(value)


class Checkpoints:
    """The trainer's observer that writes last.pt and best.pt at epoch ends, as often as that is cheap, and
    always when asked at the end.

    With train.checkpoint_every_s null (the default) the interval adapts to the measured cost of a
    write: last.pt is written once the time since the last write is at least COST_FACTOR times what
    that write took, so writing costs at most ~1/COST_FACTOR (5%) of the run, and at every epoch's end
    when epochs are longer than that. Before the first write its cost is estimated from the bytes to
    write at ASSUMED_WRITE_RATE. The tiny config (a ~20 MB checkpoint, ~0.1 s) is written every epoch;
    the reference model (~2 GB with AdamW state, ~8 s) every few minutes on a GPU. A number fixes the
    interval (0: every epoch). An improved best model is kept as an in-memory snapshot and written with
    the next last.pt, so a kill loses at most what last.pt loses.
    """

    COST_FACTOR = 20.0
    ASSUMED_WRITE_RATE = 200e6  # bytes/s: a slow disk, so the first write comes rather late than too early

    def __init__(
        self,
        folder: Path,
        run_id: str,
        every_s: float | None,
        extra: dict[str, Any],
        *,
        before_write: Callable[[], None],
        seconds: dict[str, float],
        log_points: Callable[[list[tuple[str, float, int, int]]], None] = lambda points: None,
        echo: Callable[[str], None] = lambda line: None,
    ):
        """extra: what the job adds to every checkpoint (data, tracking_uri); before_write: called before
        each write (a resume trains on from the checkpoint, so what was logged up to it must be spooled by
        then); seconds: the ledger the write time is added to ("checkpoint writes", "best snapshots");
        log_points: where the write time and interval go as metrics; echo: where the policy is announced."""
        self.folder, self.run_id, self.every_s, self.extra = folder, run_id, every_s, extra
        self.before_write, self.seconds, self.log_points, self.echo = before_write, seconds, log_points, echo
        self.staging: Path | None = None  # where files are written before their rename (gpt.checkpoint.save)
        self.last_write = time.monotonic()
        self.write_cost: float | None = None  # seconds the last write of last.pt took
        self.saved_step: int | None = None  # the optimizer step last.pt holds, once written here
        self.best_payload: dict[str, Any] | None = None
        self.written = {path.name for path in folder.glob("*.pt")}  # a resumed run's earlier files count

    def payload(self, trainer: Trainer) -> dict[str, Any]:
        """The trainer's checkpoint now (live tensors)."""
        return checkpoint.payload(trainer, self.run_id, self.extra)

    def interval(self, trainer: Trainer) -> float:
        """Seconds between writes of last.pt the policy asks for now (see the class docstring)."""
        if self.every_s is not None:
            return self.every_s
        if self.write_cost is None:
            tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
            size = 3 * sum(t.numel() * t.element_size() for t in tensors)  # weights and AdamW's two moments
            return self.COST_FACTOR * size / self.ASSUMED_WRITE_RATE
        return self.COST_FACTOR * self.write_cost

    def on_epoch_end(self, trainer: Trainer, measured: EpochMetrics) -> None:
        """Snapshot an improved model; write both files once the interval has passed."""
        if trainer.state.best_epoch == measured.epoch:
            with timed(self.seconds, "best snapshots"):
                self.best_payload = snapshot(self.payload(trainer))  # training goes on changing the tensors
        if time.monotonic() - self.last_write >= self.interval(trainer):
            first = self.write_cost is None
            self.write(trainer)
            if first:
                self.announce(measured.epoch_seconds, trainer)

    def write(self, trainer: Trainer, include_last: bool = True) -> None:
        """Write last.pt (unless include_last is False: weights that went bad, or last.pt already holds this
        step) and the held best model."""
        include_last = include_last and self.saved_step != trainer.state.step
        if not include_last and self.best_payload is None:
            return
        self.before_write()
        started = time.perf_counter()
        with timed(self.seconds, "checkpoint writes"):
            if include_last:
                checkpoint.save(self.folder / "last.pt", self.payload(trainer), self.staging)
                self.written.add("last.pt")
            if self.best_payload is not None:
                checkpoint.save(self.folder / "best.pt", self.best_payload, self.staging)
                self.best_payload = None
                self.written.add("best.pt")
        if include_last:
            self.write_cost, self.saved_step = time.perf_counter() - started, trainer.state.step
            now, epoch = int(time.time() * 1000), trainer.state.epoch
            self.log_points(
                [
                    (metrics.CHECKPOINT_SECONDS, self.write_cost, epoch, now),
                    (metrics.CHECKPOINT_INTERVAL_S, self.interval(trainer), epoch, now),
                ]
            )
        self.last_write = time.monotonic()

    def announce(self, epoch_seconds: float, trainer: Trainer) -> None:
        """Say once, after the first write, how often last.pt is written and so how much a kill can lose."""
        interval = self.interval(trainer)
        if interval <= epoch_seconds:
            lose = f"every epoch: a kill loses at most one epoch (~{epoch_seconds:,.0f} s)"
        else:
            lose = f"about every {interval:,.0f} s: a kill loses at most that much training"
        self.echo(f"checkpoint: last.pt written in {self.write_cost:.2f} s; written {lose}")


class ProgressBar:
    """Where training is, step by step (the trainer's on_step).

    On a terminal, a bar per epoch: step, loss and tokens/s. In output that is not a terminal (a shell
    script's log file), a line every `every_s` seconds: epoch, step, loss, tokens/s and the time left in
    the epoch and the run. The loss lives on the device, so it is read (a host sync) at most once a second.

    Rates are measured steps over measured time, never over a step whose start was not seen: an epoch's
    first update uses the previous epoch's rate, the run's first update the time since this object was
    made (just before training starts).
    """

    def __init__(
        self,
        tokens_per_step: int,
        enabled: bool,
        epochs: int = 1,
        terminal: bool = True,
        echo: Callable[[str], None] = print,
        every_s: float | None = None,
    ):
        """terminal: a bar on stderr, else lines through echo every every_s (default PROGRESS_LINE_EVERY_S)."""
        self.tokens_per_step, self.enabled, self.epochs, self.terminal = tokens_per_step, enabled, epochs, terminal
        self.echo, self.every_s = echo, PROGRESS_LINE_EVERY_S if every_s is None else every_s
        self.bar: tqdm | None = None
        self.epoch, self.last_read = 0, 0.0
        # the rate's baseline: (steps done, time); the first step of the run counts from now
        self.base: tuple[int | None, float] = (None, time.monotonic())
        self.steps_per_s: float | None = None
        self.last_line = time.monotonic()

    def __call__(self, epoch: int, done: int, total: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if epoch != self.epoch:
            self._start_epoch(epoch, done, total, now)
        elif self.bar is not None:
            self.bar.update(1)
        base_done, base_time = self.base
        if done > base_done and now > base_time:
            self.steps_per_s = (done - base_done) / (now - base_time)
        if self.terminal and (now - self.last_read >= 1.0 or done == total):
            left = self._left(epoch, done, total)
            run_left = f", run ~{duration(left[1])} left" if left else ""
            self.bar.set_postfix_str(f"loss {float(loss):.3f}{self._tokens_per_s()}{run_left}")
            self.last_read = now
        if not self.terminal and now - self.last_line >= self.every_s:
            self.echo(self.line(epoch, done, total, float(loss)))
            self.last_line = now
        if done == total:  # validation and the epoch's summary line come next
            self.close()

    def _start_epoch(self, epoch: int, done: int, total: int, now: float) -> None:
        """An epoch's first step seen here: a new bar, and the baseline of the epoch's rate."""
        self.close()
        first_of_run = self.base[0] is None
        self.base = (done - 1, self.base[1]) if first_of_run else (done, now)
        self.epoch = epoch
        if self.terminal:  # tqdm's own rate counts from here: steps after this one, over their time
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="step", leave=False)

    def _tokens_per_s(self) -> str:
        return f", {self.steps_per_s * self.tokens_per_step:,.0f} tokens/s" if self.steps_per_s else ""

    def _left(self, epoch: int, done: int, total: int) -> tuple[float, float] | None:
        """Seconds of training steps left in the epoch and in the run at the measured rate (None: no rate yet)."""
        if not self.steps_per_s:
            return None
        epoch_left = (total - done) / self.steps_per_s
        return epoch_left, epoch_left + (self.epochs - epoch) * total / self.steps_per_s

    def line(self, epoch: int, done: int, total: int, loss: float) -> str:
        """The progress line of output that is not a terminal: epoch, step, loss, tokens/s, time left."""
        text = f"progress: epoch {epoch}/{self.epochs}, step {done}/{total}, loss {loss:.3f}{self._tokens_per_s()}"
        left = self._left(epoch, done, total)
        if left:
            text += f", ~{duration(left[0])} left in the epoch, ~{duration(left[1])} in the run (training steps)"
        return text

    def close(self) -> None:
        """Remove the bar (an epoch's end, or training stopped)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Reporter:
    """The trainer's observer that reports each epoch: metrics, samples, the loss curve and a summary line.

    A resumed run re-trains from its checkpoint, which may be older than what the run has logged
    (checkpoints are throttled; a killed process logged epochs after its last one). Epoch metrics
    up to logged_epoch and step points up to logged_step are therefore not logged again: the
    re-trained values are the same, so the run's curves have every point exactly once.

    An epoch of the reference config on a GPU takes ~50 ms, as long as a sample or a few spool fsyncs,
    so what costs per epoch is throttled by time and always done at the final epoch: metric points
    are spooled at most every METRICS_EVERY_S (and before any checkpoint, which a resume trains on
    from: the job calls flush_points then), the loss curve redrawn at most every PLOT_EVERY_S, and
    samples that take more than SAMPLE_SHARE of an epoch taken at most every train.sample_every_s.
    """

    def __init__(
        self,
        cfg: Config,
        tracker: Tracker,
        encoding: tiktoken.Encoding,
        echo: Callable[[str], None],
        title: str,
        seconds: dict[str, float],
        logged: tuple[int, int] = (0, 0),
    ):
        """seconds: the ledger of wall time per reporting activity; logged: the (epoch, step) the run has
        logged already (gpt.resume.logged_progress), (0, 0) for a new run."""
        self.cfg, self.tracker, self.encoding, self.echo, self.title = cfg, tracker, encoding, echo, title
        self.seconds = seconds
        self.logged_epoch, self.logged_step = logged
        self.held: list[tuple[str, float, int, int]] = []  # metric points not spooled yet
        self.history: list[dict[str, Any]] = []  # the trainer's (live) per-epoch history
        self.plotted = 0  # epochs in the last loss curve sent
        self.samples_taken = 0
        self.sample_cost: float | None = None  # seconds of the cheapest epoch's samples, the first one aside
        self.last_flush = self.last_plot = self.last_sample = time.monotonic()

    def on_epoch_end(self, trainer: Trainer, measured: EpochMetrics) -> None:
        """Hold the epoch's metric points, and spool, plot and sample when due; print the summary line."""
        final = measured.epoch == self.cfg.train.epochs
        with timed(self.seconds, "metrics"):
            if measured.epoch > self.logged_epoch:
                now = int(time.time() * 1000)
                self.held += [(k, float(v), measured.epoch, now) for k, v in measured.as_metrics().items()]
                self.logged_epoch = measured.epoch
            self.hold_steps(measured.step_losses)
        if final or time.monotonic() - self.last_flush >= METRICS_EVERY_S:
            self.flush_points()
        self.history = trainer.state.history
        if final or time.monotonic() - self.last_plot >= PLOT_EVERY_S:
            self.plot()
        if self.sample_due(measured):
            self.log_samples(trainer, measured.epoch)
        val = f"{measured.val_loss:.3f}" if measured.val_loss is not None else "-"
        with timed(self.seconds, "summary line"):
            self.echo(
                f"epoch {measured.epoch}/{self.cfg.train.epochs}  train {measured.train_loss:.3f}  val {val}  "
                f"{measured.tokens_per_second:,.0f} tokens/s  {measured.epoch_seconds:.1f} s"
            )

    def log_samples(self, trainer: Trainer, epoch: int) -> None:
        """Sample from the model, log the text as samples/epoch_XXX.txt, and learn what sampling costs."""
        with timed(self.seconds, "samples"):
            started = time.perf_counter()
            self.tracker.log_text(self.samples(trainer, epoch), f"samples/epoch_{epoch:03d}.txt")
            cost = time.perf_counter() - started
        self.samples_taken += 1
        if self.samples_taken > 1:  # the first also warms the decoding path up
            self.sample_cost = cost if self.sample_cost is None else min(self.sample_cost, cost)
        self.last_sample = time.monotonic()

    def log_steps(self, step_losses: StepPoints) -> None:
        """Training stopped early: log these step points and send everything the throttles held back."""
        self.hold_steps(step_losses)
        self.flush_points()
        if len(self.history) > self.plotted:
            self.plot()

    def hold_steps(self, step_losses: StepPoints) -> None:
        """Hold the train_loss_step points after logged_step for the next flush."""
        now = int(time.time() * 1000)
        new = [(metrics.TRAIN_LOSS_STEP, loss, step, now) for step, loss in step_losses if step > self.logged_step]
        if new:
            self.logged_step = new[-1][2]
        self.held += new

    def flush_points(self) -> None:
        """Spool the held metric points as one batch (one fsync)."""
        with timed(self.seconds, "metrics"):
            self.tracker.log_points(self.held)
            self.held = []
        self.last_flush = time.monotonic()

    def plot(self) -> None:
        """Queue the loss curve of the epochs so far; the tracker's sender thread draws it."""
        with timed(self.seconds, "plot"):
            self.tracker.log_loss_curve(self.history, self.title)
        self.plotted = len(self.history)
        self.last_plot = time.monotonic()

    def sample_due(self, measured: EpochMetrics) -> bool:
        """Samples every sample_every epochs while they are cheap next to an epoch; costly ones at most every
        sample_every_s, and no more often than keeps them under SAMPLE_SHARE of the time (the reference
        model's samples on a CPU take ~a minute); always at the final epoch and the first two times
        (warm-up, then their cost). sample_every_s 0 lifts the time limits."""
        t = self.cfg.train
        final = measured.epoch == t.epochs
        if not t.sample_every or (measured.epoch % t.sample_every and not final):
            return False
        if final or self.sample_cost is None or self.sample_cost <= SAMPLE_SHARE * measured.epoch_seconds:
            return True
        if t.sample_every_s == 0:
            return True
        interval = max(t.sample_every_s, self.sample_cost / SAMPLE_SHARE)
        return time.monotonic() - self.last_sample >= interval

    def samples(self, trainer: Trainer, epoch: int) -> str:
        """The epoch's samples as text: one continuation per train.sample_prompts, seeded by seed + epoch."""
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
