"""A run's best model as an MLflow Logged Model: spooled at the end of training, registered, found back.

At the end of a finished run the best checkpoint (best.pt, else last.pt) becomes an MLflow Model
folder (gpt.mlflow_model) in the run's outbox, and a `model` item in its spool. The sender delivers
it with MlflowClient's Logged Model calls, the steps mlflow.pyfunc.log_model takes: create the
Logged Model (name `model`, source run), record it as the run's output at the best epoch, upload the
folder, mark it READY and, with --register-model NAME, create a version of the registered model NAME.
Each step done is written to model-<seq>.json beside the spool, so a delivery cut short by an outage
resumes where it stopped instead of leaving a second model behind.

The model is then `runs:/<run_id>/model`, `models:/<model_id>` and, registered, `models:/NAME/<version>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import UserError

if TYPE_CHECKING:
    import tiktoken
    import torch
    from mlflow.tracking import MlflowClient

    from gpt.config import Config
    from gpt.model import GPT
    from gpt.tracking import Tracker

MODEL_NAME = "model"  # the Logged Model's name, so runs:/<run_id>/model finds it
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
_REGISTERED_NAME = re.compile(r"^[^/:%@]{1,256}$")  # MLflow refuses / and :, and @ would read as an alias


def check_registered_name(name: str | None) -> str | None:
    """A registered model name that MLflow accepts and models:/NAME@alias can name; UserError otherwise."""
    if name is not None and (not _REGISTERED_NAME.match(name) or name.strip() in ("", ".", "..")):
        raise UserError(f"registered model name {name!r} is not allowed: use 1-256 characters without / : % or @")
    return name


def best_checkpoint(folder: Path) -> Path | None:
    """best.pt, else last.pt (a run that never validated), else None."""
    return next((folder / name for name in ("best.pt", "last.pt") if (folder / name).is_file()), None)


@contextlib.contextmanager
def _quiet_copies() -> Iterator[None]:
    """MLflow draws a progress bar for each artifact it copies into a model folder: noise in a run's output."""
    name, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def model_from_checkpoint(path: Path, encoding: tiktoken.Encoding, target: Path) -> int:
    """Write the MLflow Model folder `target` from a checkpoint; returns the checkpoint's epoch.

    Raises UserError for an unreadable checkpoint.
    """
    from gpt import checkpoint
    from gpt.mlflow_model import save_model_folder

    payload = checkpoint.load(path)
    source = f"checkpoint {path}"
    cfg = checkpoint.config_of(payload, source)
    checkpoint.require(payload, ("model",), source)
    epoch = int(payload.get("epoch") or 0)
    metadata = {"epoch": epoch, "best_val_loss": payload.get("best_val_loss"), "checkpoint": path.name}
    metadata["source_run_id"] = payload.get("run_id")
    with _quiet_copies():
        save_model_folder(payload["model"], cfg, encoding, target, metadata)
    return epoch


def spool_model(
    tracker: Tracker, checkpoints: Path, encoding: tiktoken.Encoding, register_as: str | None, echo: Callable
) -> bool:
    """At the end of a finished run: its best checkpoint as an MLflow Model, logged through the spool.

    A failure here (a full disk) is reported and leaves the run as it is: True when the model was spooled.
    """
    path = best_checkpoint(checkpoints)
    retry = f"log it later with: python train.py --log-model {tracker.run_id}"
    if path is None:
        echo(f"no checkpoint in {checkpoints}: no model logged")
        return False
    target = tracker.staging_path(MODEL_NAME)
    try:
        step = model_from_checkpoint(path, encoding, target)
    except Exception as exc:  # noqa: BLE001 - the run itself is done and fine: say so, and how to log it later
        shutil.rmtree(target.parent, ignore_errors=True)  # a partial folder, as large as the model
        echo(f"warning: the model was not logged ({type(exc).__name__}: {str(exc)[:200]}); {retry}")
        return False
    tracker.log_model(target, register_as, step)
    return True


class _Progress:
    """The steps of one model delivery that are done, kept in a JSON file (atomically replaced)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, value: Any) -> Any:
        self.done[key] = value
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.done))
        os.replace(partial, self.path)
        return value


def deliver_model(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> dict[str, Any]:
    """Log (and register) a spooled model folder; returns the steps done: model_id, version.

    Raises what MLflow raises; called again (the sender retries), it goes on from the last step done.
    """
    from mlflow.entities import LoggedModelOutput

    progress = _Progress(local_dir / f"model-{item['seq']}.json")
    if "model_id" not in progress.done:
        run = client.get_run(run_id)
        # as mlflow.pyfunc.log_model does: the run's params, and where it came from (the UI's "Logged from")
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.")}
        model = client.create_logged_model(
            run.info.experiment_id, MODEL_NAME, run_id, tags=tags, params=run.data.params, model_type="gpt"
        )
        progress.record("model_id", model.model_id)
    model_id = progress.done["model_id"]
    if "output" not in progress.done:  # the run's Logged models list, at the step (epoch) of the weights
        client.log_outputs(run_id, [LoggedModelOutput(model_id, item["step"])])
        progress.record("output", True)
    if "uploaded" not in progress.done:
        _stamp(Path(item["path"]), client.get_logged_model(model_id).artifact_location, model_id, run_id)
        client.log_model_artifacts(model_id, item["path"])
        client.finalize_logged_model(model_id, "READY")
        progress.record("uploaded", True)
    if item.get("register") and "version" not in progress.done:
        progress.record("version", register(client, model_id, run_id, item["register"]))
    return progress.done


def _stamp(folder: Path, artifact_location: str, model_id: str, run_id: str) -> None:
    """Name the Logged Model and its run in the folder's MLmodel file, as mlflow.pyfunc.log_model does."""
    from mlflow.models import Model

    mlmodel = folder / "MLmodel"
    model = Model.load(str(mlmodel))
    model.model_id, model.model_uuid, model.run_id, model.artifact_path = model_id, model_id, run_id, artifact_location
    model.save(str(mlmodel))


def register(client: MlflowClient, model_id: str, run_id: str, name: str) -> str:
    """A new version of registered model `name` (created if missing) from a Logged Model; its version number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model = client.get_logged_model(model_id)
    # the source is the model's artifact location, not models:/<model_id>: a SQLite registry resolves the
    # latter through MLflow's global tracking URI, which need not be this store's
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model_id)
    # the Logged Model's page lists its registered versions from this tag (as mlflow.register_model sets it)
    tags = client.get_logged_model(model_id).tags
    versions = json.loads(tags.get(MODEL_VERSIONS_TAG, "[]")) + [{"name": name, "version": version.version}]
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    return str(version.version)


def log_run_model(
    run_id: str, tracking_uri: str, encoding: tiktoken.Encoding, register_as: str | None = None
) -> dict[str, Any]:
    """Log an existing run's best checkpoint as its model now, without the spool (train.py --log-model).

    Returns the steps done (model_id, version). Raises UserError for an unknown run or one without checkpoints.
    """
    from gpt.runs import find_checkpoint
    from gpt.store import check_tracking_uri, open_client, with_retries

    check_tracking_uri(tracking_uri)
    try:
        path = find_checkpoint(run_id, "best", tracking_uri)
    except UserError as exc:
        if "has no checkpoints/best.pt" not in str(exc):
            raise
        path = find_checkpoint(run_id, "last", tracking_uri)
    client = open_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gpt-model-") as folder:
        target = Path(folder) / MODEL_NAME
        step = model_from_checkpoint(path, encoding, target)
        item = {"seq": 0, "kind": "model", "path": str(target), "register": register_as, "step": step}
        return with_retries(lambda: deliver_model(client, run_id, item, Path(folder)), attempts=5)


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The newest READY Logged Model named `model` that the run logged, or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'"
    )
    ready = [m for m in models if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URI set to `uri` for the block.

    Resolving models:/ and runs:/ URIs goes through stores MLflow opens from its global URIs, whatever
    URI the caller passes (and a SQLite default would create ./mlflow.db).
    """
    import mlflow

    # set_tracking_uri and set_registry_uri also export them as $MLFLOW_TRACKING_URI and $MLFLOW_REGISTRY_URI
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # back to "not set": MLflow reads the environment again
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_MODEL_URI = re.compile(r"^(models:/\S+|runs:/[0-9a-f]{32}/\S+)$")


def load_model_uri(
    uri: str, device: torch.device, tracking_uri: str | None = None
) -> tuple[GPT, Config, tiktoken.Encoding, dict[str, Any]]:
    """A logged model (models:/NAME/VERSION, models:/NAME@ALIAS, models:/<model_id>, runs:/<run_id>/model),
    its config, encoding and info (epoch, best_val_loss, run_id), like gpt.sampling.load_model for a checkpoint.

    The folder is downloaded to a temporary directory and deleted once the model is built.
    Raises UserError for a malformed URI, or a model the store does not have.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from gpt.mlflow_model import load_artifacts, model_folder_artifacts
    from gpt.store import check_tracking_uri, resolve_tracking_uri, sqlite_path

    if not _MODEL_URI.match(uri):
        raise UserError(
            f"--model {uri!r}: give models:/NAME/VERSION, models:/NAME@ALIAS, models:/<model_id> or "
            "runs:/<run_id>/model"
        )
    store = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(store)
    database = sqlite_path(store)
    if database is not None and not database.is_file():  # MLflow would create an empty store to look in
        raise UserError(f"no MLflow store at {database} ({store}): pass --tracking-uri or set MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="gpt-model-") as folder, using_store(store), _quiet_copies():
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=folder))
            mlmodel = Model.load(str(local / "MLmodel"))
        except (MlflowException, OSError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot fetch model {uri} from {store}: {reason}") from None
        model, cfg, encoding = load_artifacts(model_folder_artifacts(local), device)
    metadata = mlmodel.metadata or {}
    info = {"epoch": metadata.get("epoch"), "best_val_loss": metadata.get("best_val_loss")}
    info["run_id"] = mlmodel.run_id or metadata.get("source_run_id")
    return model, cfg, encoding, info
