"""A training run in MLflow, from the moment it exists to a final state that says what happened.

    with TrackedRun(client, run, trainer, stopper, cache_dir) as tracked:
        tracked.watch(reporter, checkpoints, progress_bar)
        trainer.fit()
    tracked.result

TrackedRun owns what every way out of training must settle: the run's lock (one process per run),
its tracker (the spool and its sender), the final status and the exit code. However training ends, the
run ends in a state that says what happened: FINISHED; KILLED on Ctrl-C or SIGTERM, after a checkpoint
to resume from (exit 130 or 143), or at once on a second one, writing nothing more; FAILED on a
non-finite loss (exit 3, best.pt kept), on a full or read-only disk (exit 5: training stops, nothing
more is written, --resume continues once there is room) or any crash (the exception goes on to the
script, which prints it in one line). Exit 4 says tracking data were left in the run's local spool,
with the command that sends them. A signal after the last training step lets the run finish.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from gpt import metrics
from gpt.errors import DiskFault, disk_fault
from gpt.reporting import Checkpoints, ProgressBar, Reporter
from gpt.resume import logged_progress, summary_points
from gpt.runs import local_run_dir
from gpt.signals import StopOnSignal
from gpt.store import absolute_uri, local_artifact_dir, resolve_tracking_uri, run_lock, with_retries
from gpt.tracking import Tracker, write_run_record
from gpt.trainer import Interrupted, NonFiniteLoss, Trainer

DISK_FAULT_WAIT_S = 30.0  # how long a run that stopped on a full or read-only disk waits for delivery

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


@dataclass
class JobResult:
    """How one training job ended (losses in nats)."""

    run_id: str
    experiment_id: str
    status: str  # FINISHED | KILLED | FAILED
    best_val_loss: float
    best_epoch: int
    final_val_loss: float | None
    message: str = ""
    exit_code: int = 0
    local_dir: str = ""  # the run's spool and lock; `train.py --replay` it when tracking was left undelivered
    report_seconds: dict[str, float] = field(default_factory=dict)  # time spent reporting, by activity


def final_val_loss(trainer: Trainer) -> float | None:
    """The last validation loss the trainer measured, or None."""
    values = (row[metrics.VAL_LOSS] for row in reversed(trainer.state.history))
    return next((value for value in values if value is not None), None)


class TrackedRun:
    """The context of one open MLflow run while a trainer trains in it (see the module docstring).

    Interrupted and NonFiniteLoss end inside the block as KILLED and FAILED runs; any other exception
    ends the run FAILED and propagates.
    """

    def __init__(
        self,
        client: MlflowClient,
        run: Run,
        trainer: Trainer,
        stopper: StopOnSignal,
        cache_dir: Path,
        echo: Callable[[str], None],
    ):
        """run: created for this job, or reopened to resume it (set RUNNING here); stopper: the signal
        handler in force, whose exit code a stop by signal takes; echo: where messages are printed."""
        self.client, self.run, self.trainer, self.stopper, self.echo = client, run, trainer, stopper, echo
        self.run_id = run.info.run_id
        self.uri = absolute_uri(client.tracking_uri)
        self.local_dir = local_run_dir(self.uri, cache_dir, self.run_id)
        self.artifacts = local_artifact_dir(run.info.artifact_uri)  # None when the artifacts are remote
        self.seconds: dict[str, float] = {}  # wall time per reporting activity, shared by the observers
        self.status, self.message, self.exit_code = "FINISHED", "", 0
        self.reporter: Reporter | None = None
        self.checkpoints: Checkpoints | None = None
        self.progress: ProgressBar | None = None
        self.result: JobResult | None = None
        self.on_finish: list[Callable[[], None]] = []  # called once a run has finished and written its checkpoints
        self._stack = contextlib.ExitStack()

    @property
    def checkpoint_folder(self) -> Path:
        """Where last.pt and best.pt go: straight into a local artifact folder, else the local run folder
        (uploaded once at the end)."""
        return (self.artifacts or self.local_dir) / "checkpoints"

    def __enter__(self) -> TrackedRun:
        self._stack.enter_context(run_lock(self.local_dir, self.run_id))  # another process's run: UserError
        try:
            write_run_record(self.local_dir, {"run_id": self.run_id, "tracking_uri": self.uri})
            # first the tracker, which spools that this process took the run up: killed any time after
            # the run shows RUNNING, a replay then knows the earlier process's end no longer holds
            self.tracker = Tracker(self.client, self.run_id, self.local_dir)
            if self.run.info.status != "RUNNING":  # a run reopened to resume it
                with_retries(lambda: self.client.update_run(self.run_id, status="RUNNING"))
        except BaseException:
            with contextlib.suppress(Exception):
                if hasattr(self, "tracker"):  # the store refused RUNNING: end the run through the spool
                    self.tracker.close("FAILED", timeout=5.0, notify=self.echo)
                else:  # no spool to end it through: end it directly, if the store lets us
                    self.client.set_terminated(self.run_id, "FAILED")
            self._stack.close()
            raise  # a full or read-only disk is a DiskFault: one line, exit 5
        return self

    def logged(self) -> tuple[int, int]:
        """The (epoch, step) the run has logged so far: what a resumed run must not log again."""
        return logged_progress(self.client, self.run_id, self.tracker.spool)

    def watch(self, reporter: Reporter, checkpoints: Checkpoints, progress: ProgressBar) -> None:
        """Report and checkpoint the trainer's epochs, and show its steps; the observers run in this order.

        Also records the run's config and data beside its spool: a run killed before its first
        checkpoint restarts from them (`train.py --resume`, gpt.resume).
        """
        self.reporter, self.checkpoints, self.progress = reporter, checkpoints, progress
        self.trainer.observers += [reporter, checkpoints]
        self.trainer.on_step = progress
        checkpoints.staging = self._staging()
        record = {"run_id": self.run_id, "tracking_uri": self.uri, "config": self.trainer.cfg.to_dict()}
        write_run_record(self.local_dir, {**record, "data": checkpoints.extra.get("data", [])})

    def _staging(self) -> Path | None:
        """Where checkpoints are written before they are renamed into a local artifact folder, so that MLflow
        never lists a partial file: the run's local folder if on the same file system (a rename cannot cross
        one), else beside the artifact folder (outside what MLflow lists). None when checkpoints are not
        artifacts (a remote store: they are uploaded once, complete)."""
        if self.artifacts is None:
            return None
        existing = self.artifacts
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        same_disk = os.stat(existing).st_dev == os.stat(self.local_dir).st_dev
        return self.local_dir / "partial" if same_disk else self.artifacts.parent / "partial"

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        try:
            try:
                self._end_training(error)
            except BaseException as failure:
                if isinstance(failure, DiskFault) and not self.stopper.forced:
                    self._stop_writing(failure)  # a full or read-only disk: nothing more can be written
                else:  # a crash, or a second Ctrl-C
                    self._abort(failure)
                    if self.stopper.forced:  # whatever the signal interrupted (torch makes it a RuntimeError)
                        raise SystemExit(self.stopper.forced) from None
                    raise
            self._deliver()
            return True
        finally:
            self._stack.close()

    def _end_training(self, error: BaseException | None) -> None:
        """Write the final checkpoints and settle status, message and exit code; re-raise anything unexpected."""
        trainer, s = self.trainer, self.trainer.state
        fault = disk_fault(error)
        if fault is not None:
            raise fault
        if error is None:
            self.checkpoints.write(trainer)
            for finished in self.on_finish:  # (the logged model: a second Ctrl-C while it is written ends it KILLED)
                finished()
            if self.stopper.signal_number:  # it came after the last step: there was nothing left to stop
                name = signal.Signals(self.stopper.signal_number).name
                self.message = f"{name} came after the last training step; the run finished all its epochs"
        elif isinstance(error, Interrupted):
            self.progress.close()  # the bar of the abandoned epoch
            self.reporter.log_steps(error.step_points)
            self.checkpoints.write(trainer)
            self.status, self.exit_code = "KILLED", self.stopper.exit_code
            self.message = (
                f"interrupted in epoch {s.epoch + 1} after step {s.step}; checkpoint saved, "
                f"continue with: {self.resume_command()}"
            )
        elif isinstance(error, NonFiniteLoss):
            self.reporter.log_steps(error.step_points)
            self.checkpoints.write(trainer, include_last=False)  # the weights are garbage now; keep the best
            kept = f"; best.pt (epoch {s.best_epoch}) is kept" if "best.pt" in self.checkpoints.written else ""
            self.status, self.exit_code, self.message = "FAILED", 3, f"training stopped: {error}{kept}"
        else:
            raise error

    def resume_command(self) -> str:
        """The command that continues this run. It names the store with --tracking-uri when a plain train.py,
        run again in this folder and environment, would look in another one (the default mlruns/ or
        $MLFLOW_TRACKING_URI): without it, the command a user copies would find no such run."""
        command = f"python train.py --resume {self.run_id}"
        if self.uri != resolve_tracking_uri():
            command += f" --tracking-uri {shlex.quote(self.uri)}"
        return command

    def _stop_writing(self, fault: DiskFault) -> None:
        """The disk refused a write (spool, sample, plot or checkpoint): training stops where it is, nothing
        more is written but the run's end, and the run ends FAILED (exit 5). What the spool and the last
        checkpoint hold is consistent (metrics are spooled before every checkpoint), so a resume, once
        there is room, trains on to the same losses and logs every point once."""
        self.stopper.immediate = True
        if self.progress is not None:
            self.progress.close()
        self.status, self.exit_code = "FAILED", DiskFault.exit_code
        remedy = "free some space" if str(fault).startswith("disk full") else "make it writable"
        self.message = f"{fault}; {remedy}, then continue with: {self.resume_command()}"

    def _abort(self, failure: BaseException) -> None:
        """End the run after a crash: KILLED at once on a second Ctrl-C, else FAILED after saving what can be."""
        self.stopper.immediate = True
        if self.stopper.forced:  # a second Ctrl-C: leave now, writing nothing more
            self.echo("stopped at once, without a checkpoint; the run ends KILLED")
            self.tracker.close("KILLED", timeout=1.0, notify=self.echo)
            return
        # best effort, each on its own: the crash may have come from these very writes
        if self.reporter is not None:
            with contextlib.suppress(Exception):
                self.reporter.flush_points()
        if self.checkpoints is not None:
            with contextlib.suppress(Exception):
                self.checkpoints.write(self.trainer, include_last=False)  # the weights may be mid-step
        self.tracker.close("FAILED", timeout=30.0, notify=self.echo)

    def _deliver(self) -> None:
        """Send the summary, remote checkpoints and end status; wait for delivery; build the result."""
        self.stopper.immediate = True  # training is over: a signal now only stops the wait for delivery
        s = self.trainer.state
        disk_failed = self.exit_code == DiskFault.exit_code  # then nothing but the end is written
        try:
            if not disk_failed:
                self.tracker.log_points(summary_points(self.tracker.spool, s.best_val_loss, s.best_epoch))
            if self.artifacts is None and not disk_failed:  # a remote artifact store: upload the checkpoints once
                for name in sorted(self.checkpoints.written):
                    self.tracker.log_file(self.checkpoint_folder / name, "checkpoints", snapshot=False)
        except DiskFault as fault:  # the training is saved; what is missing comes with the next resume
            self.exit_code, disk_failed = DiskFault.exit_code, True
            self.message += (
                f"{'; ' if self.message else ''}{fault}: the run's summary was not logged; once there is room, "
                f"{self.resume_command()} logs it"
            )
        try:
            timeout = min(self.tracker.timeout, DISK_FAULT_WAIT_S) if disk_failed else None
            delivered = self.tracker.close(self.status, timeout=timeout, notify=self.echo)
        except SystemExit:
            replay = f"python train.py --replay {self.local_dir}"
            self.echo(f"stopped waiting for the tracking server; send the rest with: {replay}")
            raise
        if not delivered:
            if disk_failed:  # the end may wait behind items the store's full disk refuses: send it first
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, self.status)
            self.message += f"{'; ' if self.message else ''}{self._undelivered(disk_failed)}"
        self.result = JobResult(
            self.run_id,
            self.run.info.experiment_id,
            self.status,
            s.best_val_loss,
            s.best_epoch,
            final_val_loss(self.trainer),
            self.message,
            self.exit_code or (0 if delivered else 4),
            str(self.local_dir),
            dict(self.seconds),
        )

    def _undelivered(self, disk_failed: bool) -> str:
        """What the store did not take, why, and the command that sends it."""
        why = f" ({self.tracker.last_error})" if self.tracker.last_error else ""
        replay = f"python train.py --replay {self.local_dir}"
        if disk_failed:  # --resume delivers the spool first; a replay ends the run instead
            return f"the tracking store did not take everything{why}; --resume sends it, or end the run with: {replay}"
        return (
            f"the tracking server did not take everything in time{why}: the rest is kept in {self.local_dir}; "
            f"send it with: {replay}"
        )
