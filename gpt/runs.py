"""Reading tracked runs back: a run id plus best | last | path -> a local checkpoint file, via MLflow."""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt import env
from gpt.errors import UserError
from gpt.store import local_artifact_dir, resolve_tracking_uri, sqlite_folder, sqlite_path

CHECKPOINTS = "checkpoints"  # where a training run logs best.pt and last.pt


class NoCheckpoint(UserError):
    """The run exists but holds no such checkpoint (--resume then starts it again, gpt.resume)."""


def local_run_dir(tracking_uri: str, cache_dir: Path, run_id: str) -> Path:
    """Spool and non-uploaded files: beside a SQLite store, else in the cache."""
    folder = sqlite_folder(tracking_uri)
    return folder / "local" / run_id if folder else cache_dir / "runs" / run_id


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _open(run_id: str, tracking_uri: str | None) -> tuple[MlflowClient, Run]:
    uri = resolve_tracking_uri(tracking_uri)
    store = sqlite_path(uri)
    if store is not None:
        # MLflow would create an empty store here and then report the run as unknown
        if not store.is_file():
            raise UserError(
                f"no MLflow store at {store} ({uri}): train a model first, or pass --tracking-uri "
                "or set MLFLOW_TRACKING_URI"
            )
    client = MlflowClient(uri)
    try:
        return client, client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"unknown run id {run_id!r} in {uri}") from None
        raise UserError(f"cannot read run {run_id!r} from {uri}: {_reason(exc)}") from None


def find_checkpoint(
    run_id: str, which: str = "best", tracking_uri: str | None = None, cache_dir: Path | None = None
) -> Path:
    """The local file of a run's checkpoint.

    which: `best` or `last` (checkpoints/<which>.pt), an artifact path inside the run, else a local
    file. Artifacts in a local store are used in place; remote ones are downloaded to cache_dir (default
    $GPT_CACHE_DIR, gpt.env).
    """
    client, run = _open(run_id, tracking_uri)
    artifact = f"{CHECKPOINTS}/{which}.pt" if which in ("best", "last") else which
    in_run = not Path(artifact).is_absolute() and ".." not in Path(artifact).parts  # else only a local file
    try:
        listed = (
            {f.path for f in client.list_artifacts(run_id, posixpath.dirname(artifact) or None)} if in_run else set()
        )
        if artifact not in listed:
            if which not in ("best", "last") and Path(which).is_file():
                return Path(which)
            saved = sorted(f.path for f in client.list_artifacts(run_id, CHECKPOINTS) if f.path.endswith(".pt"))
            if not saved:
                nothing = f"run {run_id} has no checkpoint: nothing under {CHECKPOINTS}/ (did an epoch finish?)"
                raise NoCheckpoint(nothing)
            raise NoCheckpoint(f"run {run_id} has no {artifact}; its checkpoints: {', '.join(saved)}")
        local = local_artifact_dir(run.info.artifact_uri)
        if local is not None:
            return local / artifact
        target = (cache_dir or env.cache_dir()) / "checkpoints" / run_id / artifact
        target.parent.mkdir(parents=True, exist_ok=True)
        # each process downloads into its own folder and moves the file into place: torchrun's ranks
        # resuming at once never read a half-written checkpoint
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as staging:
            fetched = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, tracking_uri=client.tracking_uri, dst_path=staging
            )
            os.replace(fetched, target)
        return target
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot fetch {artifact} of run {run_id}: {_reason(exc)}") from None


def log_text(run_id: str, artifact_path: str, text: str, tracking_uri: str | None = None) -> None:
    """Add a text file to an existing run's artifacts (finished runs included)."""
    client, _ = _open(run_id, tracking_uri)
    try:
        client.log_text(run_id, text, artifact_path)
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot log {artifact_path} to run {run_id}: {_reason(exc)}") from None
