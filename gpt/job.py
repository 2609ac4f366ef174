"""One training job: check everything, open (or reopen) an MLflow run, train, report, finish.

Checks that can fail on user input (config, data, tokenizer, tracking URI) all run before a run is
created, so a mistake never leaves an empty or RUNNING run behind.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from gpt import checkpoint
from gpt.config import Config, apply_overrides, dump_yaml, validate
from gpt.data import Corpus, DataStats, build_corpus, data_stats
from gpt.errors import UserError
from gpt.model import GPT, count_parameters, flops_per_token
from gpt.runs import find_checkpoint
from gpt.sampling import sample_text
from gpt.tokenizer import get_encoding
from gpt.tracking import (
    Tracker,
    check_tracking_uri,
    ensure_experiment,
    local_artifact_dir,
    resolve_tracking_uri,
    sqlite_folder,
    with_retries,
)
from gpt.trainer import EpochMetrics, Interrupted, NonFiniteLoss, Trainer, TrainState, autocast_dtype, resolve_device

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+=,:@-]{0,249}$")


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


def default_run_name(cfg: Config) -> str:
    m = cfg.model
    return f"L{m.n_layers}-H{m.n_heads}-E{m.emb_dim}-ctx{m.context_length}-s{cfg.window_stride}"


def check_run_name(name: str) -> str:
    if not _RUN_NAME.match(name) or ".." in name:
        raise UserError(
            f"run name {name!r} is not allowed: use letters, digits, spaces and . _ - + = , : @ (no '/' or '..')"
        )
    return name


def prepare(cfg: Config, options: JobOptions) -> Prepared:
    """Everything that can fail on user input, before any run exists."""
    encoding = get_encoding(options.tokenizer_file)
    corpus = build_corpus(cfg, encoding, options.cache_dir)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA GPU is available; use --device auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is mps but MPS is not available; use --device auto or cpu")
    return Prepared(cfg, corpus, data_stats(cfg, corpus), device, count_parameters(cfg.model))


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

    def __init__(self, folder: Path, cfg: Config, run_id: str, every_s: float):
        self.folder, self.cfg, self.run_id, self.every_s = folder, cfg, run_id, every_s
        self.last_write = time.monotonic()
        self.best_payload: dict[str, Any] | None = None
        self.written: set[str] = set()

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


class Reporter:
    """The trainer's observer: metrics, samples, plot and checkpoints after each epoch."""

    def __init__(
        self,
        prepared: Prepared,
        tracker: Tracker,
        checkpoints: Checkpoints,
        encoding,
        options: JobOptions,
        logged_epochs: int = 0,
    ):
        self.prepared, self.tracker, self.checkpoints = prepared, tracker, checkpoints
        self.encoding, self.options, self.logged_epochs = encoding, options, logged_epochs
        self.title = default_run_name(prepared.cfg)

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        cfg, epochs = self.prepared.cfg, self.prepared.cfg.train.epochs
        improved = trainer.state.best_epoch == metrics.epoch
        if metrics.epoch > self.logged_epochs:  # a resumed run re-trains epochs it may have logged
            points = [(k, float(v), metrics.epoch, int(time.time() * 1000)) for k, v in metrics.as_metrics().items()]
            points += [("train_loss_step", loss, step, int(time.time() * 1000)) for step, loss in metrics.step_losses]
            self.tracker.log_points(points)
            self.tracker.log_loss_curve(trainer.state.history, self.title)
        if cfg.train.sample_every and (metrics.epoch % cfg.train.sample_every == 0 or metrics.epoch == epochs):
            self.tracker.log_text(self.samples(trainer, metrics.epoch), f"samples/epoch_{metrics.epoch:03d}.txt")
        self.checkpoints.on_epoch(trainer, improved)
        val = f"{metrics.val_loss:.3f}" if metrics.val_loss is not None else "-"
        self.options.echo(
            f"epoch {metrics.epoch}/{epochs}  train {metrics.train_loss:.3f}  val {val}  "
            f"{metrics.tokens_per_second:,.0f} tokens/s  {metrics.epoch_seconds:.1f} s"
        )

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


class StopOnSignal:
    """First Ctrl-C/SIGTERM asks the trainer to stop after the current step; a second exits at once."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.signal_number = trainer, 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        if self.signal_number:
            raise SystemExit(128 + number)
        self.signal_number = number
        self.trainer.stop_requested = True


def start_run(client: MlflowClient, prepared: Prepared, options: JobOptions, uri: str) -> str:
    experiment_id = ensure_experiment(client, options.experiment)
    tags = {**run_tags(prepared), **options.tags}
    if options.parent_run_id:
        tags["mlflow.parentRunId"] = options.parent_run_id
    run_name = check_run_name(options.run_name or default_run_name(prepared.cfg))
    return start_run_in(client, experiment_id, run_name, tags)


def start_run_in(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    run = with_retries(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags))
    return run.info.run_id


def resume_options(target: str, options: JobOptions, overrides: list[str]) -> tuple[Config, dict[str, Any], str]:
    """The config, checkpoint payload and run id to continue, from a run id or a checkpoint path."""
    path = Path(target)
    if not (path.suffix == ".pt" or path.is_file()):
        path = find_checkpoint(target, "last", options.tracking_uri)
    payload = checkpoint.load(path)
    cfg = checkpoint.config_of(payload, source=str(path))
    apply_overrides(cfg, overrides)  # e.g. more epochs, another device
    validate(cfg)
    run_id = payload.get("run_id")
    if not run_id:
        raise UserError(f"checkpoint {path} names no MLflow run to continue")
    if payload["state"]["epoch"] >= cfg.train.epochs:
        raise UserError(f"run {run_id} already finished its {cfg.train.epochs} epochs; add --epochs N to train longer")
    return cfg, payload, run_id


def train(
    cfg: Config,
    options: JobOptions,
    prepared: Prepared | None = None,
    resume_payload: dict[str, Any] | None = None,
    resume_run_id: str | None = None,
    claim: Callable[[str], str | None] | None = None,
) -> JobResult:
    """Train one run end to end. With resume_payload, continue that checkpoint in its own run.

    `claim(run_id)`, called once the run exists, may veto it (another worker owns this ablation
    cell): the run is deleted and the result's status is CLAIMED, with the reason as message.
    """
    prepared = prepared or prepare(cfg, options)
    uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    state, logged_epochs = TrainState(), 0
    if resume_payload is not None and resume_run_id is not None:
        checkpoint.load_model_state(model, resume_payload["model"], "checkpoint")
        state = TrainState(**resume_payload["state"])
        run_id = resume_run_id
        with_retries(lambda: client.update_run(run_id, status="RUNNING"))
        logged_epochs = max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)
    else:
        run_id = start_run(client, prepared, options, uri)
        reason = claim(run_id) if claim else None
        if reason:
            with_retries(lambda: client.delete_run(run_id))
            return JobResult(run_id, "", "CLAIMED", float("nan"), 0, None, reason)
    run = with_retries(lambda: client.get_run(run_id))
    local_dir = local_run_dir(uri, options.cache_dir, run_id)
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    tracker = Tracker(client, run_id, local_dir)
    artifacts = local_artifact_dir(run.info.artifact_uri)
    checkpoints = Checkpoints((artifacts or local_dir) / "checkpoints", cfg, run_id, cfg.train.checkpoint_every_s)
    trainer = Trainer(cfg, model, prepared.corpus, prepared.device, state)
    if resume_payload is not None:
        if resume_payload.get("optimizer"):
            trainer.optimizer.load_state_dict(resume_payload["optimizer"])
        checkpoint.set_rng_state(resume_payload["rng"])
    else:
        tracker.log_params(run_params(prepared))
        tracker.log_text(dump_yaml(cfg), "config.yaml")
    encoding = get_encoding(options.tokenizer_file)
    trainer.observers.append(Reporter(prepared, tracker, checkpoints, encoding, options, logged_epochs))
    status, message, exit_code = "FINISHED", "", 0
    with StopOnSignal(trainer) as stopper:
        try:
            trainer.fit()
            checkpoints.write(trainer)
        except Interrupted:
            checkpoints.write(trainer)
            status, exit_code = "KILLED", 128 + stopper.signal_number
            message = f"interrupted at epoch {trainer.state.epoch + 1}, step {trainer.state.step}; checkpoint saved"
        except NonFiniteLoss as exc:
            checkpoints.write(trainer, include_last=False)  # the weights are garbage now; keep the best
            status, exit_code, message = "FAILED", 3, f"training stopped: {exc}"
        except BaseException:
            tracker.close("FAILED", timeout=30)
            raise
    if artifacts is None:  # a remote artifact store: upload the final checkpoints once
        for name in sorted(checkpoints.written):
            tracker.log_file(checkpoints.folder / name, "checkpoints", snapshot=False)
    delivered = tracker.close(status)
    if not delivered:
        message += (
            f"{'; ' if message else ''}the tracking server could not be reached: what it is missing is kept in "
            f"{local_dir} (send it with: python train.py replay {local_dir})"
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
        exit_code if delivered or exit_code else 4,
    )
