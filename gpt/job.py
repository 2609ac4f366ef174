"""One training job: check everything, open (or reopen) an MLflow run, train, report, finish.

Checks that can fail on user input (config, data, tokenizer, tracking URI, the checkpoint to resume)
all run before a run is created or reopened, so a mistake never leaves an empty or RUNNING run
behind. Once a run is open, every way out of training ends it: FINISHED; KILLED on Ctrl-C or
SIGTERM, with a checkpoint to resume from; FAILED on a non-finite loss or a crash.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from gpt import checkpoint
from gpt.config import Config, apply_overrides, dump_yaml, validate
from gpt.data import Corpus, DataStats, build_corpus, data_stats
from gpt.errors import UserError
from gpt.model import GPT, count_parameters, flops_per_token
from gpt.runs import find_checkpoint
from gpt.sampling import sample_text
from gpt.tokenizer import get_encoding
from gpt.tracking import (
    Spool,
    Tracker,
    absolute_uri,
    check_tracking_uri,
    ensure_experiment,
    local_artifact_dir,
    open_client,
    resolve_tracking_uri,
    run_lock,
    sqlite_folder,
    with_retries,
)
from gpt.trainer import (
    EpochMetrics,
    Interrupted,
    NonFiniteLoss,
    StepPoints,
    Trainer,
    TrainState,
    autocast_dtype,
    resolve_device,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+=,:@-]{0,249}$")
RUN_ID = re.compile(r"[0-9a-f]{32}")
# What a resumed run may change: how long it trains, and where and how often it reports. Any other
# key would make the run's logged params describe something it did not train.
RESUMABLE_KEYS = ("train.epochs", "train.device", "train.compile", "train.checkpoint_every_s", "train.sample_every")
PROGRESS_KEYS = ("train_loss", "train_loss_step")  # the metrics whose last step says how far a run has logged


@dataclass
class JobOptions:
    experiment: str = "gpt"
    run_name: str | None = None
    tracking_uri: str | None = None
    cache_dir: Path = Path(".cache")
    tokenizer_file: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    echo: Callable[[str], None] = print


@dataclass
class Prepared:
    cfg: Config
    corpus: Corpus
    stats: DataStats
    device: torch.device
    n_params: int
    resumed: Trainer | None = None  # restored from the checkpoint to resume, already checked against cfg and data


@dataclass
class JobResult:
    run_id: str
    experiment_id: str
    status: str  # FINISHED | KILLED | FAILED
    best_val_loss: float
    best_epoch: int
    final_val_loss: float | None
    message: str = ""
    exit_code: int = 0
    local_dir: str = ""  # the run's spool and lock; `train.py --replay` it when tracking was left undelivered


@dataclass
class Resumption:
    """What --resume continues: the run's config (its data files included), checkpoint, run and store."""

    cfg: Config
    payload: dict[str, Any]
    run_id: str
    tracking_uri: str
    path: Path


def default_run_name(cfg: Config) -> str:
    m = cfg.model
    return f"L{m.n_layers}-H{m.n_heads}-E{m.emb_dim}-ctx{m.context_length}-s{cfg.window_stride}"


def check_run_name(name: str) -> str:
    if not _RUN_NAME.match(name) or ".." in name:
        raise UserError(
            f"run name {name!r} is not allowed: use letters, digits, spaces and . _ - + = , : @ (no '/' or '..')"
        )
    return name


def check_names(options: JobOptions) -> None:
    if options.run_name is not None:
        check_run_name(options.run_name)
    if not options.experiment.strip():
        raise UserError("the experiment name must not be empty (--experiment NAME)")


def prepare(cfg: Config, options: JobOptions, resume_payload: dict[str, Any] | None = None) -> Prepared:
    """Everything that can fail on user input, before any run exists (or is reopened)."""
    check_names(options)
    encoding = get_encoding(options.tokenizer_file)
    corpus = build_corpus(cfg, encoding, options.cache_dir)
    device = resolve_device(cfg.train.device)
    prepared = Prepared(cfg, corpus, data_stats(cfg, corpus), device, count_parameters(cfg.model))
    if resume_payload is not None:
        prepared.resumed = build_trainer(cfg, prepared, resume_payload)
    return prepared


def describe(prepared: Prepared) -> list[str]:
    s, cfg = prepared.stats, prepared.cfg
    return [
        f"model: {prepared.n_params:,} parameters ({prepared.n_params * 4 / 2**20:,.0f} MB fp32), "
        f"{flops_per_token(cfg.model, cfg.window_length) / 1e6:,.1f} MFLOP per token",
        f"data: {s.train_tokens:,} train tokens, {s.val_tokens:,} validation tokens",
        f"windows: {s.train_windows:,} train (length {cfg.window_length}, stride {cfg.window_stride}), "
        f"{s.val_windows:,} validation",
        f"per epoch: {s.steps_per_epoch:,} steps of batch {cfg.train.batch_size}, {s.tokens_per_epoch:,} tokens",
        f"device: {prepared.device}",
    ]


def run_params(prepared: Prepared) -> dict[str, Any]:
    cfg, s = prepared.cfg, prepared.stats
    params: dict[str, Any] = {**cfg.flat(), "data.max_length": cfg.window_length, "data.stride": cfg.window_stride}
    params["data.files"] = ",".join(cfg.data.files)
    params.update(
        n_params=prepared.n_params,
        flops_per_token=flops_per_token(cfg.model, cfg.window_length),
        tokens_per_epoch=s.tokens_per_epoch,
        train_tokens=s.train_tokens,
        val_tokens=s.val_tokens,
        train_windows=s.train_windows,
        val_windows=s.val_windows,
        steps_per_epoch=s.steps_per_epoch,
        device=str(prepared.device),
        dtype=str(autocast_dtype(cfg, prepared.device) or torch.float32).replace("torch.", ""),
    )
    for i, info in enumerate(prepared.corpus.files):
        params[f"data.file{i}.path"] = info["path"]
        params[f"data.file{i}.sha256"] = info["sha256"]
        params[f"data.file{i}.tokens"] = info["tokens"]
    return params


def run_tags(prepared: Prepared) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = prepared.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "git_commit": commit or "unknown",
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "device_name": name,
        "mlflow.source.name": "train.py",
    }


def local_run_dir(tracking_uri: str, cache_dir: Path, run_id: str) -> Path:
    """Spool and non-uploaded files: beside a SQLite store, else in the cache."""
    folder = sqlite_folder(tracking_uri)
    return folder / "local" / run_id if folder else cache_dir / "runs" / run_id


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
        prepared: Prepared,
        tracker: Tracker,
        checkpoints: Checkpoints,
        encoding,
        options: JobOptions,
        logged_epoch: int = 0,
        logged_step: int = 0,
    ):
        self.prepared, self.tracker, self.checkpoints = prepared, tracker, checkpoints
        self.encoding, self.options = encoding, options
        self.logged_epoch, self.logged_step = logged_epoch, logged_step
        self.title = default_run_name(prepared.cfg)

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        cfg, epochs = self.prepared.cfg, self.prepared.cfg.train.epochs
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
        self.options.echo(
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
        t = self.prepared.cfg.train
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


def _notice(text: str) -> None:
    """Write from a signal handler: print() could re-enter a write the handler interrupted."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopOnSignal:
    """First Ctrl-C/SIGTERM asks the trainer to stop after the current step; a second exits at once.

    With `immediate` (set once training is over and only delivery is left) the first signal exits.
    Python runs signal handlers in the main thread only: in another thread (an ablation worker)
    this does nothing, and whoever runs the thread stops its trainer with `trainer.stop_requested`.
    """

    def __init__(self, trainer: Trainer):
        self.trainer, self.signal_number, self.immediate = trainer, 0, False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGINT)  # a stop asked for in code counts as Ctrl-C

    def _handle(self, number: int, frame: object) -> None:
        if self.signal_number or self.immediate:
            raise SystemExit(128 + number)
        self.signal_number = number
        self.trainer.stop_requested = True
        _notice("\nstopping after this step to save a checkpoint; press Ctrl-C again to exit at once\n")


def start_run(client: MlflowClient, prepared: Prepared, options: JobOptions, uri: str) -> str:
    experiment_id = ensure_experiment(client, options.experiment)
    tags = {**run_tags(prepared), **options.tags}
    if options.parent_run_id:
        tags["mlflow.parentRunId"] = options.parent_run_id
    run_name = check_run_name(options.run_name or default_run_name(prepared.cfg))
    run = with_retries(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags))
    return run.info.run_id


def existing_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    try:
        run = with_retries(lambda: client.get_run(run_id))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"run {run_id} is not in {uri}; pass the --tracking-uri it was trained with") from None
        raise
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"run {run_id} is deleted in {uri}; restore it in MLflow before resuming it")
    return run


def resume_options(target: str, options: JobOptions, overrides: Sequence[str]) -> Resumption:
    """The config, checkpoint and run to continue, from a run id (its last.pt) or a checkpoint file.

    The store is options.tracking_uri, else (for a file) the one the checkpoint names, else the default.
    Only RESUMABLE_KEYS may be overridden; the data are the very files the run trained on.
    """
    by_id = RUN_ID.fullmatch(target) is not None and not Path(target).exists()
    uri = resolve_tracking_uri(options.tracking_uri)
    if by_id:
        check_tracking_uri(uri)
        local = local_run_dir(uri, options.cache_dir, target) / "checkpoints" / "last.pt"
        path = local if local.is_file() else find_checkpoint(target, "last", uri)  # remote stores: local first
    else:
        path = Path(target).expanduser()
        if path.is_dir():
            raise UserError(f"--resume {target}: is a folder; give a run id or a checkpoint file (.pt)")
        if not path.is_file() and path.suffix != ".pt":
            raise UserError(f"--resume {target!r} is neither a run id (32 hex digits) nor a checkpoint file")
    source = f"checkpoint {path}"
    payload = checkpoint.load(path)
    checkpoint.require(payload, ("config", "model", "optimizer", "state", "rng", "run_id"), source)
    run_id = payload["run_id"]
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise UserError(f"{source} names no MLflow run to continue (run_id is {run_id!r})")
    if by_id and run_id != target:
        raise UserError(f"{source} belongs to run {run_id}, not to run {target}")
    cfg = checkpoint.config_of(payload, source)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key not in RESUMABLE_KEYS:
            raise UserError(
                f"--resume continues run {run_id} with its own config: only {', '.join(RESUMABLE_KEYS)} "
                f"may change, not {key}"
            )
    apply_overrides(cfg, overrides)
    validate(cfg)
    if payload.get("data"):
        cfg.data.files = [info["path"] for info in payload["data"]]
    state = TrainState.from_dict(payload["state"], source)
    if state.epoch >= cfg.train.epochs:
        raise UserError(
            f"run {run_id} already trained its {cfg.train.epochs} epochs; "
            f"add --epochs N (more than {state.epoch}) to train it longer"
        )
    if not by_id and not options.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = payload.get("tracking_uri") or uri
    return Resumption(cfg, payload, run_id, uri, path)


def check_same_data(payload: dict[str, Any], prepared: Prepared) -> None:
    """A run resumes on the very text it trained on: a changed file would change every later loss."""
    trained_on = payload.get("data")
    if not trained_on:
        return
    if len(trained_on) != len(prepared.corpus.files):
        raise UserError(
            f"run {payload['run_id']} trained on {len(trained_on)} data files, not {len(prepared.corpus.files)}"
        )
    for old, new in zip(trained_on, prepared.corpus.files, strict=True):
        if old["sha256"] != new["sha256"]:
            raise UserError(
                f"data file {new['path']} changed since run {payload['run_id']} trained on it (sha256 "
                f"{old['sha256'][:12]}... then, {new['sha256'][:12]}... now); restore it or start a new run"
            )


def build_trainer(cfg: Config, prepared: Prepared, payload: dict[str, Any] | None) -> Trainer:
    """The model and trainer, new or restored from a checkpoint; a checkpoint that does not fit raises UserError."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if payload is None:
        return Trainer(cfg, model, prepared.corpus, prepared.device)
    source = "the checkpoint"
    check_same_data(payload, prepared)
    checkpoint.load_model_state(model, payload["model"], source)
    state = TrainState.from_dict(payload["state"], source)
    trainer = Trainer(cfg, model, prepared.corpus, prepared.device, state)
    if payload["optimizer"]:
        try:
            trainer.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: its optimizer state does not fit the model ({exc})") from None
    # Nothing draws from torch's generator between here and the first step (samples use their own).
    checkpoint.set_rng_state(payload["rng"], source)
    return trainer


def logged_progress(client: MlflowClient, run_id: str, spool: Spool) -> tuple[int, int]:
    """The last epoch and step a run has logged, sent or still in its spool."""
    spooled = spool.last_steps(PROGRESS_KEYS)
    last = []
    for key in PROGRESS_KEYS:
        history = with_retries(lambda key=key: client.get_metric_history(run_id, key))
        last.append(max([spooled[key], *(m.step for m in history)]))
    return last[0], last[1]


def train(
    cfg: Config,
    options: JobOptions,
    prepared: Prepared | None = None,
    resume_payload: dict[str, Any] | None = None,
    resume_run_id: str | None = None,
) -> JobResult:
    """Train one run end to end. With resume_payload, continue that checkpoint in its own run."""
    if (resume_payload is None) != (resume_run_id is None):
        raise ValueError("resume_payload and resume_run_id go together")
    prepared = prepared or prepare(cfg, options, resume_payload)
    uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking_uri(uri)
    if resume_payload is not None and prepared.resumed is not None:
        trainer, prepared.resumed = prepared.resumed, None  # a trainer trains one run
    else:
        trainer = build_trainer(cfg, prepared, resume_payload)
    client = open_client(uri)
    with StopOnSignal(trainer) as stopper:  # from here on a run exists, and a signal must end it properly
        if resume_run_id is not None:
            run = existing_run(client, resume_run_id, uri)
        else:
            run = with_retries(lambda: client.get_run(start_run(client, prepared, options, uri)))
        local_dir = local_run_dir(uri, options.cache_dir, run.info.run_id)
        with run_lock(local_dir, run.info.run_id):
            if resume_run_id is not None:
                with_retries(lambda: client.update_run(resume_run_id, status="RUNNING"))
            resuming = resume_run_id is not None
            return _train_run(trainer, prepared, options, client, run, local_dir, stopper, resuming)


def _train_run(
    trainer: Trainer,
    prepared: Prepared,
    options: JobOptions,
    client: MlflowClient,
    run: Run,
    local_dir: Path,
    stopper: StopOnSignal,
    resuming: bool,
) -> JobResult:
    """Train in an open run and end it, whatever happens."""
    cfg, run_id, uri = prepared.cfg, run.info.run_id, absolute_uri(client.tracking_uri)
    tracker = Tracker(client, run_id, local_dir)
    status, message, exit_code = "FINISHED", "", 0
    try:  # the outer try also ends the run when a handler below fails (a full disk while saving)
        try:
            (local_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
            artifacts = local_artifact_dir(run.info.artifact_uri)
            data = [{**info, "path": str(Path(info["path"]).resolve())} for info in prepared.corpus.files]
            extra = {"data": data, "tracking_uri": uri}
            folder = (artifacts or local_dir) / "checkpoints"
            checkpoints = Checkpoints(folder, cfg, run_id, cfg.train.checkpoint_every_s, extra)
            logged = logged_progress(client, run_id, tracker.spool) if resuming else (0, 0)
            reporter = Reporter(prepared, tracker, checkpoints, get_encoding(options.tokenizer_file), options, *logged)
            trainer.observers.append(reporter)
            tokens_per_step = cfg.train.batch_size * cfg.window_length
            trainer.on_step = ProgressBar(tokens_per_step, options.progress and sys.stderr.isatty())
            if not resuming:
                tracker.log_params(run_params(prepared))
                tracker.log_text(dump_yaml(cfg), "config.yaml")
            trainer.fit()
            checkpoints.write(trainer)
        except Interrupted as exc:
            trainer.on_step.close()  # the bar of the abandoned epoch
            reporter.log_steps(exc.step_points)
            checkpoints.write(trainer)
            status, exit_code = "KILLED", stopper.exit_code
            s = trainer.state
            message = (
                f"interrupted in epoch {s.epoch + 1} after step {s.step}; checkpoint saved, "
                f"continue with: python train.py --resume {run_id}"
            )
        except NonFiniteLoss as exc:
            reporter.log_steps(exc.step_points)
            checkpoints.write(trainer, include_last=False)  # the weights are garbage now; keep the best
            kept = f"; best.pt (epoch {trainer.state.best_epoch}) is kept" if "best.pt" in checkpoints.written else ""
            status, exit_code, message = "FAILED", 3, f"training stopped: {exc}{kept}"
    except BaseException as exc:
        stopper.immediate = True
        if isinstance(exc, SystemExit) and stopper.signal_number:  # a second Ctrl-C: leave now
            options.echo("stopped at once, without a checkpoint; the run ends KILLED")
            tracker.close("KILLED", timeout=1.0, notify=options.echo)
        else:
            tracker.close("FAILED", timeout=30.0, notify=options.echo)
        raise
    stopper.immediate = True  # training is over: a signal now only stops the wait for delivery
    try:
        if artifacts is None:  # a remote artifact store: upload the final checkpoints once
            for name in sorted(checkpoints.written):
                tracker.log_file(checkpoints.folder / name, "checkpoints", snapshot=False)
        delivered = tracker.close(status, notify=options.echo)
    except SystemExit:
        options.echo(
            f"stopped waiting for the tracking server; send the rest with: python train.py --replay {local_dir}"
        )
        raise
    if not delivered:
        message += (
            f"{'; ' if message else ''}the tracking server did not take everything in time: the rest is kept in "
            f"{local_dir}; send it with: python train.py --replay {local_dir}"
        )
    history = trainer.state.history
    final_val = next((row["val_loss"] for row in reversed(history) if row["val_loss"] is not None), None)
    return JobResult(
        run_id,
        run.info.experiment_id,
        status,
        trainer.state.best_val_loss,
        trainer.state.best_epoch,
        final_val,
        message,
        exit_code or (0 if delivered else 4),
        str(local_dir),
    )
