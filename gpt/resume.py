"""Continuing a run: which checkpoint, config and store --resume means, and how far the run has logged;
and how a run whose process died ends.

A run resumes with its own config (only keys marked resumable in gpt.config may change) on the very files it trained on,
in its own MLflow run. A run with no checkpoint starts again from epoch 0 in the same run; a run whose
checkpoint completed its epochs is ended FINISHED. A replay (`train.py --replay`) ends a run whose
process died as its last checkpoint says: FINISHED when complete, FAILED otherwise.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt import checkpoint, metrics
from gpt.config import Config, apply_overrides, resumable_keys, validate
from gpt.data import Corpus
from gpt.errors import UserError, check_file
from gpt.runs import NoCheckpoint, check_run_store, find_checkpoint, local_run_dir
from gpt.store import check_tracking_uri, local_artifact_dir, resolve_tracking_uri, sqlite_path, with_retries
from gpt.tracking import Ending, Replayed, Spool, replay, run_meta, write_run_record
from gpt.trainer import TrainState

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Resumption:
    """What --resume continues: the run's config (its data files included), checkpoint, run and store.

    A run that saved no checkpoint restarts from epoch 0 (payload then holds only config, data and
    run_id, and path is None); a run whose checkpoint completed its epochs is `complete`: it is ended
    FINISHED, with nothing to train.
    """

    cfg: Config
    payload: dict[str, Any]
    run_id: str
    tracking_uri: str
    path: Path | None
    complete: bool = False

    def describe(self) -> str:
        """The line printed before training resumes."""
        epochs = self.cfg.train.epochs
        if self.complete:
            return f"run {self.run_id} already trained its {epochs} epochs: --resume ends it FINISHED, training nothing"
        if self.path is None:
            return f"restarting run {self.run_id} from epoch 1 of {epochs}: it saved no checkpoint"
        state = self.payload["state"]
        return (
            f"resuming run {self.run_id} from {self.path}: epoch {state['epoch'] + 1} of {epochs}, "
            f"after batch {state['batch_in_epoch']} (step {state['step']})"
        )


def is_restart(payload: dict[str, Any] | None) -> bool:
    """Whether a resume payload starts its run again from epoch 0 (it holds no training state)."""
    return payload is not None and "state" not in payload


def resume_options(target: str, tracking_uri: str | None, cache_dir: Path, overrides: Sequence[str]) -> Resumption:
    """The config, checkpoint and run to continue, from a run id (its last.pt) or a checkpoint file.

    The store is tracking_uri (the option), else (for a file) the one the checkpoint names, else the default.
    Only resumable keys (gpt.config.resumable_keys) may be overridden; the data are the very files the run trained on.
    A run id without a checkpoint restarts from its recorded config (UserError when none is recorded here).
    """
    by_id = RUN_ID.fullmatch(target) is not None and not os.path.lexists(target)
    uri = resolve_tracking_uri(tracking_uri)
    if by_id:
        check_tracking_uri(uri)
        local = local_run_dir(uri, cache_dir, target)
        try:  # remote stores: the local copy first
            path = local / "checkpoints" / "last.pt" if (local / "checkpoints" / "last.pt").is_file() else None
            path = path or find_checkpoint(target, "last", tracking_uri)  # None: the default store, named so
        except NoCheckpoint as missing:
            return _restart(target, local, uri, overrides, missing)
    else:
        path = Path(target).expanduser()
        if os.path.lexists(path) or path.suffix == ".pt":
            check_file(path, "--resume", missing=f"checkpoint not found: {path}")  # a folder, device, pipe...
        else:
            raise UserError(f"--resume {target!r} is neither a run id (32 hex digits) nor a checkpoint file")
    source = f"checkpoint {path}"
    payload = checkpoint.load(path)
    checkpoint.require(payload, ("config", "model", "optimizer", "state", "rng", "run_id"), source)
    run_id = payload["run_id"]
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise UserError(f"{source} names no MLflow run to continue (run_id is {run_id!r})")
    if by_id and run_id != target:
        raise UserError(f"{source} belongs to run {run_id}, not to run {target}")
    cfg = _resumed_config(payload, source, run_id, overrides)
    state = TrainState.from_dict(payload["state"], source)
    if not by_id and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = resolve_tracking_uri(payload.get("tracking_uri") or uri)
        _check_checkpoint_store(uri, path)
    if sqlite_path(uri) is not None:  # a local store: it must exist, hold the run, and not have moved
        check_run_store(run_id, uri, "resuming")
    return Resumption(cfg, payload, run_id, uri, path, complete=state.epoch >= cfg.train.epochs)


def _resumed_config(payload: dict[str, Any], source: str, run_id: str, overrides: Sequence[str]) -> Config:
    """The run's own config with the (resumable) overrides, on the very files it trained on."""
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
    return cfg


def _restart(run_id: str, local: Path, uri: str, overrides: Sequence[str], missing: UserError) -> Resumption:
    """A run killed before its first checkpoint starts again from epoch 0, in the same run, from the config
    and data recorded beside its spool (gpt.tracked_run); UserError when they are not on this machine."""
    try:
        _, _, record = run_meta(local)
    except UserError:
        record = {}
    if not isinstance(record.get("config"), dict) or record.get("run_id") != run_id:
        raise UserError(
            f"{missing}; and its config is not recorded on this machine ({local / 'run.json'}), so it cannot "
            "start again: train a new run instead"
        ) from None
    payload = {"config": record["config"], "data": record.get("data") or [], "run_id": run_id}
    cfg = _resumed_config(payload, f"{local / 'run.json'}", run_id, overrides)
    return Resumption(cfg, payload, run_id, uri, None)


def summary_points(spool: Spool, best_val_loss: float, best_epoch: int) -> list[tuple[str, float, int, int]]:
    """best_val_loss and best_epoch at step best_epoch (gpt.metrics), unless the spool holds them there
    already (a resumed run whose best epoch came before): every point is logged once."""
    if not best_epoch:
        return []
    now = int(time.time() * 1000)
    wanted = [(metrics.BEST_VAL_LOSS, float(best_val_loss)), (metrics.BEST_EPOCH, float(best_epoch))]
    logged = spool.points(key for key, _ in wanted)
    return [(key, value, best_epoch, now) for key, value in wanted if (key, best_epoch, value) not in logged]


def ending_from_checkpoint(local_dir: Path, client: MlflowClient, run_id: str) -> Ending:
    """How a run whose process died ends (gpt.tracking.replay): FINISHED, with its summary, when its last
    checkpoint completed its epochs; FAILED otherwise (`--resume` continues it, or starts it again)."""
    path = local_dir / "checkpoints" / "last.pt"  # remote stores keep checkpoints here until the end
    if not path.is_file():
        try:
            artifacts = local_artifact_dir(with_retries(lambda: client.get_run(run_id)).info.artifact_uri)
        except Exception:  # the store will tell the replay itself why it cannot take anything
            artifacts = None
        path = artifacts / "checkpoints" / "last.pt" if artifacts else path
    try:
        payload = checkpoint.load(path, mmap=True)
        epoch, epochs = checkpoint.position(payload)["epoch"], payload["config"]["train"]["epochs"]
        best = payload["state"] if isinstance(payload.get("state"), dict) else payload
        complete = int(epoch) >= int(epochs)
    except (UserError, KeyError, TypeError, ValueError):  # no checkpoint, or none this tool can read
        return Ending("FAILED")
    if not complete:
        return Ending("FAILED")
    return Ending("FINISHED", summary_points(Spool(local_dir), best.get("best_val_loss"), best.get("best_epoch", 0)))


def replay_run(local_dir: Path, tracking_uri: str | None = None) -> Replayed:
    """`train.py --replay`: deliver a run's spool and, if its process died, end it as its checkpoint says."""
    return replay(local_dir, tracking_uri, ending=functools.partial(ending_from_checkpoint, local_dir))


def finish_complete(resumption: Resumption, cache_dir: Path) -> Replayed:
    """`--resume` of a run whose last checkpoint completed its epochs: deliver its spool, log its summary
    and end it FINISHED, training nothing. UserError when the run is FINISHED already."""
    uri, run_id = resumption.tracking_uri, resumption.run_id
    epochs, done = resumption.cfg.train.epochs, resumption.payload["state"]["epoch"]
    try:
        status = with_retries(lambda: MlflowClient(uri).get_run(run_id)).info.status
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"run {run_id} is not in {uri}; pass the --tracking-uri it was trained with") from None
        raise
    if status == "FINISHED":
        raise UserError(
            f"run {run_id} already trained {done} epochs (its plan: {epochs}); add --epochs N (more than {done}) to "
            "train it longer"
        )
    local = local_run_dir(uri, cache_dir, run_id)
    if not (local / "run.json").is_file():  # resumed on another machine than it trained on
        write_run_record(local, {"run_id": run_id, "tracking_uri": uri})
    return replay(local, uri, ending=functools.partial(ending_from_checkpoint, local), always_end=True)


def _check_checkpoint_store(uri: str, checkpoint_file: Path) -> None:
    """UserError when the SQLite store a checkpoint file names is gone (a moved store), naming the store
    found in a folder above the checkpoint, if any."""
    store = sqlite_path(uri)
    if store is None or store.exists():  # something there: check_run_store says whether it is a store
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
