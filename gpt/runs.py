"""Reading tracked runs back: a run id plus best | last | path -> a local checkpoint file, via MLflow."""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt import env
from gpt.errors import UserError, check_file
from gpt.store import default_store_note, local_artifact_dir, require_store, resolve_tracking_uri, sqlite_folder

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
    """The client and the run; UserError for a store that is missing or unusable (gpt.store.require_store),
    or a run it does not hold. Creates no store: MLflow would make one here and then report the run as unknown."""
    uri = resolve_tracking_uri(tracking_uri)
    note = default_store_note(tracking_uri)
    require_store(uri, f"{note}: train a model first, or pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    try:
        return client, client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"unknown run id {run_id!r} in {uri}{default_store_note(tracking_uri)}") from None
        raise UserError(f"cannot read run {run_id!r} from {uri}: {_reason(exc)}") from None


@dataclass(frozen=True)
class Moved:
    """A local store found at new_root whose runs recorded their artifacts under old_root (gone)."""

    old_root: Path
    new_root: Path
    recorded: Path  # the run's artifact folder as MLflow recorded it

    @property
    def folder(self) -> Path:
        """The run's artifact folder where it is now."""
        return self.new_root / self.recorded.relative_to(self.old_root)


def moved_store(run: Run, tracking_uri: str) -> Moved | None:
    """Where a moved SQLite store's run keeps its artifacts now, or None when nothing moved.

    MLflow records absolute artifact locations, so after `mv mlruns elsewhere/` the store still names
    the old folder. When that folder is gone, the run's artifacts are looked up beside the store: the
    longest tail of the recorded path (from the run id up) that exists under the store's folder.
    """
    recorded = local_artifact_dir(run.info.artifact_uri)
    store = sqlite_folder(tracking_uri)
    run_id = run.info.run_id
    if recorded is None or store is None or recorded.exists() or run_id not in recorded.parts:
        return None
    parts = recorded.parts
    last = len(parts) - 1 - parts[::-1].index(run_id)
    for start in range(1, last + 1):
        if store.joinpath(*parts[start:]).is_dir():
            return Moved(Path(*parts[:start]), store, recorded)
    return None


def artifact_folder(run: Run, tracking_uri: str) -> Path | None:
    """The local folder of a run's artifacts (found beside a moved store), or None when they are remote."""
    moved = moved_store(run, tracking_uri)
    return moved.folder if moved else local_artifact_dir(run.info.artifact_uri)


def refuse_moved_store(run: Run, tracking_uri: str, doing: str) -> None:
    """UserError when the run's store was moved: `doing` (resuming, replaying, logging) would write its
    artifacts to the recorded, missing folder. The message names it and the fix."""
    moved = moved_store(run, tracking_uri)
    if moved is not None:
        raise UserError(
            f"run {run.info.run_id} keeps its artifacts at {moved.recorded}, which is gone: the store moved from "
            f"{moved.old_root} to {moved.new_root}; {doing} writes to the recorded place, so move the store back "
            f"or link it there: ln -s {moved.new_root} {moved.old_root}"
        )


def check_run_store(run_id: str, tracking_uri: str, doing: str) -> None:
    """UserError unless the run is in an existing store that was not moved (refuse_moved_store): what
    resuming and replaying need before they write anything."""
    _, run = _open(run_id, tracking_uri)
    refuse_moved_store(run, resolve_tracking_uri(tracking_uri), doing)


def _listed(client: MlflowClient, run_id: str, folder: Path | None, path: str | None) -> set[str]:
    """The artifact paths directly under `path` of the run: read from its local folder, else from MLflow."""
    if folder is not None:
        inside = folder / path if path else folder
        return {posixpath.join(path or "", p.name) for p in inside.iterdir()} if inside.is_dir() else set()
    return {f.path for f in client.list_artifacts(run_id, path)}


def find_checkpoint(
    run_id: str, which: str = "best", tracking_uri: str | None = None, cache_dir: Path | None = None
) -> Path:
    """The local file of a run's checkpoint.

    which: `best` or `last` (checkpoints/<which>.pt), an artifact path inside the run, else a local
    file. Artifacts in a local store are used in place (beside the store if it was moved, see
    moved_store); remote ones are downloaded to cache_dir (default $GPT_CACHE_DIR, gpt.env).
    """
    client, run = _open(run_id, tracking_uri)
    artifact = f"{CHECKPOINTS}/{which}.pt" if which in ("best", "last") else which
    in_run = not Path(artifact).is_absolute() and ".." not in Path(artifact).parts  # else only a local file
    try:
        local = artifact_folder(run, client.tracking_uri)
        listed = _listed(client, run_id, local, posixpath.dirname(artifact) or None) if in_run else set()
        if artifact not in listed:
            if which not in ("best", "last") and os.path.lexists(which):  # a local file (a folder, device... is named)
                return check_file(Path(which), "--checkpoint")
            saved = sorted(f for f in _listed(client, run_id, local, CHECKPOINTS) if f.endswith(".pt"))
            if not saved:
                nothing = f"run {run_id} has no checkpoint: nothing under {CHECKPOINTS}/ (did an epoch finish?)"
                raise NoCheckpoint(nothing)
            raise NoCheckpoint(f"run {run_id} has no {artifact}; its checkpoints: {', '.join(saved)}")
        if local is not None:
            return local / artifact
        return _download(run_id, artifact, client.tracking_uri, cache_dir or env.cache_dir())
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot fetch {artifact} of run {run_id}: {_reason(exc)}") from None


def _download(run_id: str, artifact: str, tracking_uri: str, cache_dir: Path) -> Path:
    """A remote run's artifact, downloaded once into cache_dir/checkpoints/<run_id>/."""
    target = cache_dir / "checkpoints" / run_id / artifact
    target.parent.mkdir(parents=True, exist_ok=True)
    # each process downloads into its own folder and moves the file into place: torchrun's ranks
    # resuming at once never read a half-written checkpoint
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as staging:
        fetched = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, tracking_uri=tracking_uri, dst_path=staging
        )
        os.replace(fetched, target)
    return target


def log_text(run_id: str, artifact_path: str, text: str, tracking_uri: str | None = None) -> None:
    """Add a text file to an existing run's artifacts (finished runs included).

    Raises UserError for an unknown run or a moved store (see refuse_moved_store).
    """
    client, run = _open(run_id, tracking_uri)
    refuse_moved_store(run, client.tracking_uri, "logging")
    try:
        client.log_text(run_id, text, artifact_path)
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot log {artifact_path} to run {run_id}: {_reason(exc)}") from None
