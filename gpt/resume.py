"""Continuing a run: which checkpoint, config and store --resume means, and how far the run has logged.

A run resumes with its own config (only keys marked resumable in gpt.config may change) on the very files it trained on,
in its own MLflow run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from gpt import checkpoint, metrics
from gpt.config import Config, apply_overrides, resumable_keys, validate
from gpt.data import Corpus
from gpt.errors import UserError
from gpt.runs import check_run_store, find_checkpoint, local_run_dir
from gpt.store import check_tracking_uri, resolve_tracking_uri, sqlite_path, with_retries
from gpt.tracking import Spool
from gpt.trainer import TrainState

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Resumption:
    """What --resume continues: the run's config (its data files included), checkpoint, run and store."""

    cfg: Config
    payload: dict[str, Any]
    run_id: str
    tracking_uri: str
    path: Path


def resume_options(target: str, tracking_uri: str | None, cache_dir: Path, overrides: Sequence[str]) -> Resumption:
    """The config, checkpoint and run to continue, from a run id (its last.pt) or a checkpoint file.

    The store is tracking_uri (the option), else (for a file) the one the checkpoint names, else the default.
    Only resumable keys (gpt.config.resumable_keys) may be overridden; the data are the very files the run trained on.
    """
    by_id = RUN_ID.fullmatch(target) is not None and not Path(target).exists()
    uri = resolve_tracking_uri(tracking_uri)
    if by_id:
        check_tracking_uri(uri)
        local = local_run_dir(uri, cache_dir, target) / "checkpoints" / "last.pt"
        path = local if local.is_file() else find_checkpoint(target, "last", tracking_uri)  # remote stores: local first
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
        if "=" in item and key not in resumable_keys():
            raise UserError(
                f"--resume continues run {run_id} with its own config: only {', '.join(resumable_keys())} "
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
    if not by_id and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = resolve_tracking_uri(payload.get("tracking_uri") or uri)
        _check_checkpoint_store(uri, path)
    if sqlite_path(uri) is not None:  # a local store: it must exist, hold the run, and not have moved
        check_run_store(run_id, uri, "resuming")
    return Resumption(cfg, payload, run_id, uri, path)


def _check_checkpoint_store(uri: str, checkpoint_file: Path) -> None:
    """UserError when the SQLite store a checkpoint file names is gone (a moved store), naming the store
    found in a folder above the checkpoint, if any."""
    store = sqlite_path(uri)
    if store is None or store.is_file():
        return
    beside = next((f / store.name for f in checkpoint_file.resolve().parents if (f / store.name).is_file()), None)
    found = f"; the store above the checkpoint: --tracking-uri sqlite:///{beside}" if beside else ""
    raise UserError(f"checkpoint {checkpoint_file} names the store {store}, which does not exist (moved?){found}")


def check_same_data(payload: dict[str, Any], corpus: Corpus) -> None:
    """A run resumes on the very text it trained on: a changed file would change every later loss."""
    trained_on = payload.get("data")
    if not trained_on:
        return
    if len(trained_on) != len(corpus.files):
        raise UserError(f"run {payload['run_id']} trained on {len(trained_on)} data files, not {len(corpus.files)}")
    for old, new in zip(trained_on, corpus.files, strict=True):
        if old["sha256"] != new["sha256"]:
            raise UserError(
                f"data file {new['path']} changed since run {payload['run_id']} trained on it (sha256 "
                f"{old['sha256'][:12]}... then, {new['sha256'][:12]}... now); restore it or start a new run"
            )


def logged_progress(client: MlflowClient, run_id: str, spool: Spool) -> tuple[int, int]:
    """The last epoch and step a run has logged, sent or still in its spool."""
    spooled = spool.last_steps(metrics.PROGRESS)
    last = []
    for key in metrics.PROGRESS:
        history = with_retries(lambda key=key: client.get_metric_history(run_id, key))
        last.append(max([spooled[key], *(m.step for m in history)]))
    return last[0], last[1]
