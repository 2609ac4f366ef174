"""One training job: check everything, open (or reopen) an MLflow run, train, report, finish.

Checks that can fail on user input (config, data, tokenizer, tracking URI, the checkpoint to resume)
all run before a run is created or reopened, so a mistake never leaves an empty or RUNNING run
behind. Once a run is open, every way out of training ends it: FINISHED; KILLED on Ctrl-C or
SIGTERM, with a checkpoint to resume from; FAILED on a non-finite loss or a crash.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt import checkpoint, distributed, system_metrics
from gpt.config import Config, dump_yaml
from gpt.data import Corpus, DataStats, build_corpus, data_stats
from gpt.datasets import log_datasets
from gpt.distributed import Ranks
from gpt.errors import UserError
from gpt.logged_model import spool_model
from gpt.model import GPT, count_parameters, flops_per_token
from gpt.reporting import Checkpoints, ProgressBar, Reporter
from gpt.resume import check_same_data, logged_progress
from gpt.run_summary import log_summary
from gpt.runs import local_run_dir
from gpt.signals import StopOnSignal
from gpt.store import (
    absolute_uri,
    check_tracking_uri,
    ensure_experiment,
    local_artifact_dir,
    open_client,
    resolve_tracking_uri,
    run_lock,
    with_retries,
)
from gpt.tokenizer import get_encoding
from gpt.tracking import Tracker
from gpt.trainer import Interrupted, NonFiniteLoss, Trainer, TrainState, autocast_dtype, resolve_device

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
    ranks: Ranks = field(default_factory=Ranks)  # this process among those of a torchrun launch
    log_model: bool = True  # log the best model as an MLflow Model when the run finishes
    register_model: str | None = None  # and register it under this name


@dataclass
class Prepared:
    cfg: Config
    corpus: Corpus
    stats: DataStats
    device: torch.device
    n_params: int
    ranks: Ranks
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
    report_seconds: dict[str, float] = field(default_factory=dict)  # time spent reporting, by activity


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
    if options.ranks.active:
        device = distributed.join(options.ranks, device)
    stats = data_stats(cfg, corpus)
    prepared = Prepared(cfg, corpus, stats, device, count_parameters(cfg.model), options.ranks)
    if resume_payload is not None:
        prepared.resumed = build_trainer(cfg, prepared, resume_payload)
    return prepared


def describe(prepared: Prepared) -> list[str]:
    s, cfg, ranks = prepared.stats, prepared.cfg, prepared.ranks
    lines = [
        f"model: {prepared.n_params:,} parameters ({prepared.n_params * 4 / 2**20:,.0f} MB fp32), "
        f"{flops_per_token(cfg.model, cfg.window_length) / 1e6:,.1f} MFLOP per token",
        f"data: {s.train_tokens:,} train tokens, {s.val_tokens:,} validation tokens",
        f"windows: {s.train_windows:,} train (length {cfg.window_length}, stride {cfg.window_stride}), "
        f"{s.val_windows:,} validation",
        f"per epoch: {s.steps_per_epoch:,} steps of batch {cfg.train.batch_size}, {s.tokens_per_epoch:,} tokens",
        f"device: {prepared.device}",
    ]
    if ranks.active:
        share = -(-cfg.train.batch_size // ranks.world_size)
        lines.append(f"ranks: {ranks.world_size} processes, up to {share} windows of each batch on each")
    return lines


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
        "world_size": str(prepared.ranks.world_size),
        "mlflow.source.name": "train.py",
    }


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


def build_trainer(cfg: Config, prepared: Prepared, payload: dict[str, Any] | None) -> Trainer:
    """The model and trainer, new or restored from a checkpoint; a checkpoint that does not fit raises UserError."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if payload is None:
        trainer = Trainer(cfg, model, prepared.corpus, prepared.device, ranks=prepared.ranks)
        distributed.seed_rank(prepared.ranks, cfg.train.seed, 0)
        return trainer
    source = "the checkpoint"
    check_same_data(payload, prepared.corpus)
    checkpoint.load_model_state(model, payload["model"], source)
    state = TrainState.from_dict(payload["state"], source)
    trainer = Trainer(cfg, model, prepared.corpus, prepared.device, state, prepared.ranks)
    if payload["optimizer"]:
        try:
            trainer.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: its optimizer state does not fit the model ({exc})") from None
    # Nothing draws from torch's generator between here and the first step (samples use their own).
    checkpoint.set_rng_state(payload["rng"], source)
    distributed.seed_rank(prepared.ranks, cfg.train.seed, state.step)
    return trainer


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
    if not prepared.ranks.is_main:
        return _follow(trainer)
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


def _follow(trainer: Trainer) -> JobResult:
    """Train as a rank other than 0: the same steps, and nothing tracked or saved (rank 0 does that).

    The exit code is 0 whatever the status: torchrun ends every process as soon as one exits non-zero,
    and rank 0, which stopped at the same step, may still be writing the checkpoint. Rank 0's exit
    code is the run's.
    """
    status = "FINISHED"
    with StopOnSignal(trainer):
        try:
            trainer.fit()
        except Interrupted:
            status = "KILLED"
        except NonFiniteLoss:
            status = "FAILED"
    s = trainer.state
    final_val = next((row["val_loss"] for row in reversed(s.history) if row["val_loss"] is not None), None)
    return JobResult("", "", status, s.best_val_loss, s.best_epoch, final_val)


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
    reporter: Reporter | None = None
    try:  # the outer try also ends the run when a handler below fails (a full disk while saving)
        try:
            (local_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
            system_metrics.start(tracker, cfg.train.system_metrics)  # the tracker stops it when it closes
            artifacts = local_artifact_dir(run.info.artifact_uri)
            data = [{**info, "path": str(Path(info["path"]).resolve())} for info in prepared.corpus.files]
            extra = {"data": data, "tracking_uri": uri}
            folder = (artifacts or local_dir) / "checkpoints"
            checkpoints = Checkpoints(folder, cfg, run_id, cfg.train.checkpoint_every_s, extra)
            logged = logged_progress(client, run_id, tracker.spool) if resuming else (0, 0)
            encoding = get_encoding(options.tokenizer_file)
            title = default_run_name(cfg)
            reporter = Reporter(cfg, tracker, checkpoints, encoding, options.echo, title, *logged)
            trainer.observers.append(reporter)
            tokens_per_step = cfg.train.batch_size * cfg.window_length
            trainer.on_step = ProgressBar(tokens_per_step, options.progress and sys.stderr.isatty())
            if not resuming:
                tracker.log_params(run_params(prepared))
                tracker.log_text(dump_yaml(cfg), "config.yaml")
                log_datasets(tracker, prepared.corpus, options.cache_dir)
            trainer.fit()
            checkpoints.write(trainer)
            if options.log_model:  # a finished run's best model (a Ctrl-C while it is written ends the run KILLED)
                spool_model(tracker, checkpoints.folder, encoding, options.register_model, options.echo)
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
            if reporter is not None:
                reporter.salvage(trainer)
            tracker.close("FAILED", timeout=30.0, notify=options.echo)
        raise
    stopper.immediate = True  # training is over: a signal now only stops the wait for delivery
    try:
        log_summary(tracker, title, cfg, prepared.n_params, prepared.corpus, trainer.state)
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
        dict(reporter.seconds),
    )
