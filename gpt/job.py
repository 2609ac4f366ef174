"""One training job: check everything, open (or reopen) an MLflow run, train in it, end it.

A training run reads top to bottom through four modules: train.py (options) -> gpt.job.train (this
module) -> gpt.trainer.Trainer.fit (the epoch loop) -> gpt.model.GPT (the network). Reporting and
tracking sit behind gpt.tracked_run.TrackedRun, whose observers the trainer calls after each epoch.

Checks that can fail on user input (config, data, tokenizer, tracking URI, the checkpoint to resume)
all run in prepare(), before a run is created or reopened, so a mistake never leaves an empty or
RUNNING run behind. Once a run is open, TrackedRun ends it in a state that says what happened.
"""

from __future__ import annotations

import dataclasses
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

from gpt import checkpoint, distributed
from gpt.config import Config, dump_yaml, resumable_keys
from gpt.data import Corpus, build_corpus, data_stats
from gpt.device import autocast_dtype, check_fits, device_name, loss_chunk_rows, resolve_device
from gpt.distributed import Ranks
from gpt.errors import UserError
from gpt.estimate import describe_estimate, estimate
from gpt.mlflow_native import make_native
from gpt.model import GPT
from gpt.reporting import Checkpoints, ProgressBar, Reporter
from gpt.resume import check_same_data, is_restart
from gpt.signals import StopOnSignal
from gpt.sizes import DataStats, count_parameters, flops_per_token
from gpt.store import check_tracking_uri, ensure_experiment, open_client, resolve_tracking_uri, with_retries
from gpt.tokenizer import get_encoding
from gpt.tracked_run import JobResult, TrackedRun, final_val_loss
from gpt.tracking import Tracker
from gpt.trainer import Interrupted, NonFiniteLoss, Trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_RUN_NAME = 250  # characters: MLflow's runs.name column


@dataclass
class JobOptions:
    """How and where a job runs and reports, beside its Config."""

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
    """Everything prepare() checked and built before a run exists: config, tokens, sizes, device."""

    cfg: Config
    corpus: Corpus
    stats: DataStats
    device: torch.device
    n_params: int
    ranks: Ranks
    resumed: Trainer | None = None  # restored from the checkpoint to resume, already checked against cfg and data

    def take_trainer(self) -> Trainer | None:
        """The trainer restored by prepare(), once: a trainer trains one run."""
        trainer, self.resumed = self.resumed, None
        return trainer


def default_run_name(cfg: Config) -> str:
    """A run name that says the shape, e.g. L12-H12-E768-ctx128-s128 (stride in tokens)."""
    m = cfg.model
    return f"L{m.n_layers}-H{m.n_heads}-E{m.emb_dim}-ctx{m.context_length}-s{cfg.window_stride}"


def check_run_name(name: str) -> str:
    """The name, or UserError when MLflow cannot take it.

    MLflow stores any text as a run name (a tag, and a column of 250 characters), Unicode included:
    only what breaks it or its display is refused: more than 250 characters, control characters
    (tabs, newlines), and nothing but spaces.
    """
    if not name.strip() or len(name) > MAX_RUN_NAME or not name.isprintable():
        raise UserError(
            f"run name {name!r} is not allowed: MLflow takes 1 to {MAX_RUN_NAME} printable characters in any "
            "script, not only spaces (no tabs, newlines or other control characters)"
        )
    return name


def check_grid_name(name: str) -> str:
    """A grid's name: a run name (the parent run's) that is also searched for in MLflow, where a filter
    string has no escapes, and that names files (its Slurm script): UserError with quotes or '/'."""
    check_run_name(name)
    if any(c in name for c in "'\"/"):
        raise UserError(f"grid name {name!r} is not allowed: it names files and is searched in MLflow (no ' \" or /)")
    return name


def check_names(options: JobOptions) -> None:
    """UserError for a run or experiment name that cannot be used."""
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
    n_params = count_parameters(cfg.model)
    check_fits(n_params, device)
    prepared = Prepared(cfg, corpus, stats, device, n_params, options.ranks)
    if resume_payload is not None:
        prepared.resumed = build_trainer(cfg, prepared, resume_payload)
    return prepared


def describe(prepared: Prepared) -> list[str]:
    """The lines printed before training: model size and FLOPs, data, windows, steps, device."""
    s, cfg, ranks = prepared.stats, prepared.cfg, prepared.ranks
    lines = [
        f"model: {prepared.n_params:,} parameters ({prepared.n_params * 4 / 2**20:,.0f} MB fp32), "
        f"{flops_per_token(cfg.model, cfg.window_length) / 1e6:,.1f} MFLOP per token",
        f"data: {s.train_tokens:,} train tokens, {s.val_tokens:,} validation tokens",
        f"windows: {s.train_windows:,} train (length {cfg.window_length}, stride {cfg.window_stride}), "
        f"{s.val_windows:,} validation",
        f"per epoch: {s.steps_per_epoch:,} steps of batch {cfg.train.batch_size}, {s.tokens_per_epoch:,} tokens",
        f"device: {prepared.device}, {precision_phrase(cfg, prepared.device)}",
    ]
    if cfg.window_stride > cfg.window_length:
        lines.insert(3, stride_gap_line(cfg.window_stride, cfg.window_length, s))
    if ranks.active:
        share = -(-cfg.train.batch_size // ranks.world_size)
        lines.append(f"ranks: {ranks.world_size} processes, up to {share} windows of each batch on each")
    if ranks.is_main:  # the others print nothing: no need to time anything there
        found = estimate(cfg, s, prepared.device, ranks.world_size)
        if prepared.resumed is not None:  # a resumed run trains only the epochs left
            left = max(0, cfg.train.epochs - prepared.resumed.state.epoch)
            found = dataclasses.replace(found, epochs=left, left=True)
        lines += describe_estimate(found, prepared.device, prepared.n_params)
    return lines


def precision_phrase(cfg: Config, device: torch.device) -> str:
    """'bf16 autocast (train.precision=fp32 for full fp32)' or 'fp32': how the training steps compute."""
    if autocast_dtype(cfg.train, device) is None:
        return "fp32"
    return "bf16 autocast" + (" (train.precision=fp32 for full fp32)" if cfg.train.precision == "auto" else "")


def stride_gap_line(stride: int, length: int, stats: DataStats) -> str:
    """What a stride longer than the window leaves out of training."""
    return (
        f"note: data.stride {stride} is longer than the window ({length} tokens): {stats.uncovered_fraction:.1%} "
        f"of the training tokens ({stats.uncovered_tokens:,}) are in no window and are never trained on"
    )


def run_params(prepared: Prepared) -> dict[str, Any]:
    """The run's MLflow params: the flattened config (window and stride in tokens), sizes, the device's
    settings as resolved (device, loss_chunk_rows, dtype) and data files."""
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
        train_uncovered_fraction=round(s.uncovered_fraction, 6),  # text no window holds (a stride over the window)
        device=str(prepared.device),
        loss_chunk_rows=loss_chunk_rows(cfg.model, prepared.device),  # model.loss_chunk_rows's null (auto), resolved
        dtype=str(autocast_dtype(cfg.train, prepared.device) or torch.float32).replace("torch.", ""),
    )
    for i, info in enumerate(prepared.corpus.files):
        params[f"data.file{i}.path"] = info["path"]
        params[f"data.file{i}.sha256"] = info["sha256"]
        params[f"data.file{i}.tokens"] = info["tokens"]
    return params


def run_tags(prepared: Prepared) -> dict[str, str]:
    """The run's MLflow tags: git commit, versions, device, world size."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_commit": commit or "unknown",
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "device_name": device_name(prepared.device),
        "world_size": str(prepared.ranks.world_size),
        "mlflow.source.name": "train.py",
    }


def start_run(client: MlflowClient, prepared: Prepared, options: JobOptions) -> Run:
    """Create the job's MLflow run (in its experiment, nested under a grid's parent if any)."""
    experiment_id = ensure_experiment(client, options.experiment)
    tags = {**run_tags(prepared), **options.tags}
    if options.parent_run_id:
        tags["mlflow.parentRunId"] = options.parent_run_id
    run_name = check_run_name(options.run_name or default_run_name(prepared.cfg))
    return with_retries(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags))


def existing_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    """The run to resume; UserError when it is not in the store or is deleted."""
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
    """The model and trainer, new or restored from a training checkpoint (UserError when it does not fit)."""
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, GPT(cfg.model), prepared.corpus, prepared.device, ranks=prepared.ranks)
    if payload is not None:
        check_same_data(payload, prepared.corpus)
    if payload is not None and not is_restart(payload):  # a run without a checkpoint starts again from epoch 0
        # nothing draws from torch's generator between here and the first step (samples use their own)
        checkpoint.restore(trainer, payload)
    distributed.seed_rank(prepared.ranks, cfg.train.seed, trainer.state.step)
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
    trainer = prepared.take_trainer() if resume_payload is not None else None
    trainer = trainer or build_trainer(cfg, prepared, resume_payload)
    if not prepared.ranks.is_main:
        return _follow(trainer)
    client = open_client(uri)
    encoding = get_encoding(options.tokenizer_file)
    with StopOnSignal(trainer) as stopper:  # from here on a run exists, and a signal must end it properly
        run = existing_run(client, resume_run_id, uri) if resume_run_id else start_run(client, prepared, options)
        with TrackedRun(client, run, trainer, stopper, options.cache_dir, options.echo) as tracked:
            logged = tracked.logged() if resume_run_id else (0, 0)  # what a resumed run must not log twice
            title = default_run_name(cfg)
            reporter = Reporter(cfg, tracked.tracker, encoding, options.echo, title, tracked.seconds, logged)
            # a resume trains on from a checkpoint, so what was logged up to it must be spooled before it is written
            checkpoints = Checkpoints(
                tracked.checkpoint_folder,
                tracked.run_id,
                cfg.train.checkpoint_every_s,
                checkpoint_extra(prepared, tracked.uri),
                before_write=reporter.flush_points,
                seconds=tracked.seconds,
                log_points=tracked.tracker.log_points,
                echo=options.echo,
            )
            tokens_per_step, terminal = cfg.train.batch_size * cfg.window_length, sys.stderr.isatty()
            progress = ProgressBar(tokens_per_step, options.progress, cfg.train.epochs, terminal, options.echo)
            tracked.watch(reporter, checkpoints, progress)
            make_native(tracked, prepared, options, encoding, new_run=resume_run_id is None)
            if resume_run_id is None:
                tracked.tracker.log_params(run_params(prepared))
                tracked.tracker.log_text(dump_yaml(cfg), "config.yaml")
            else:
                record_new_plan(tracked.tracker, run, cfg)
            trainer.fit()
    return tracked.result


def record_new_plan(tracker: Tracker, run: Run, cfg: Config) -> None:
    """A resume that changes resumable keys (e.g. --epochs) records the new values where the UI shows them:
    MLflow params cannot change, so each becomes a tag plan.<key>, and config.yaml is logged again."""
    flat = cfg.flat()
    changed = {key: flat[key] for key in resumable_keys() if run.data.params.get(key, str(flat[key])) != str(flat[key])}
    if changed:
        tracker.set_tags({f"plan.{key}": value for key, value in changed.items()})
        tracker.log_text(dump_yaml(cfg), "config.yaml")


def checkpoint_extra(prepared: Prepared, tracking_uri: str) -> dict[str, Any]:
    """What every checkpoint of the job carries besides the trainer: the data files (absolute paths, sha256,
    tokens) and the store, so that `--resume <file>` needs nothing else."""
    data = [{**info, "path": str(Path(info["path"]).resolve())} for info in prepared.corpus.files]
    return {"data": data, "tracking_uri": tracking_uri}


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
    return JobResult("", "", status, s.best_val_loss, s.best_epoch, final_val_loss(trainer))
