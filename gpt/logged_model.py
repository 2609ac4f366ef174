"""A run's best model as an MLflow Logged Model: spooled at the end of training, logged later, found back.

At the end of a finished run the best checkpoint (best.pt, else last.pt) becomes an MLflow Model
folder (gpt.mlflow_model) in the run's outbox, and a `model` item in its spool, which the sender
delivers (gpt.delivery: the Logged Model, its upload and, with --register-model NAME, a version of
the registered model NAME). `train.py --log-model RUN_ID` does the same for a trained run at once.
The model is then `runs:/<run_id>/model`, `models:/<model_id>` and, registered, `models:/NAME/<version>`.
"""

from __future__ import annotations

import contextlib
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

    from gpt.config import Config
    from gpt.model import GPT
    from gpt.tracking import Tracker

# MLflow refuses / and :; @ would read as an alias; whitespace, ? and # break the models:/NAME/VERSION URI
# the model is loaded by (MLflow's own loader and generate.py --model)
_REGISTERED_NAME = re.compile(r"^[^/:%@?#\s]{1,256}$")


def check_registered_name(name: str | None) -> str | None:
    """A registered model name that MLflow accepts and models:/NAME@alias can name; UserError otherwise."""
    if name is not None and (not _REGISTERED_NAME.match(name) or not name.isprintable() or name in (".", "..")):
        raise UserError(
            f"registered model name {name!r} is not allowed: use 1-256 characters without spaces or / : % @ ? # "
            "(it is loaded back as models:/NAME/VERSION), e.g. my-gpt"
        )
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
    position = checkpoint.position(payload)
    epoch = int(position["epoch"] or 0)
    metadata = {"epoch": epoch, "best_val_loss": position["best_val_loss"], "checkpoint": path.name}
    metadata["source_run_id"] = position["run_id"]
    with _quiet_copies():
        save_model_folder(payload["model"], cfg, encoding, target, metadata)
    return epoch


def spool_model(
    tracker: Tracker, checkpoints: Path, encoding: tiktoken.Encoding, register_as: str | None, echo: Callable
) -> bool:
    """At the end of a finished run: its best checkpoint as an MLflow Model, logged through the spool.

    A failure here (a full disk) is reported and leaves the run as it is: True when the model was spooled.
    """
    from gpt.delivery import MODEL_NAME

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


def log_run_model(
    run_id: str,
    tracking_uri: str,
    encoding: tiktoken.Encoding,
    register_as: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Log an existing run's best checkpoint as its model now, without the spool (train.py --log-model).

    Returns the steps done (model_id, version). Raises UserError for an unknown run or one without checkpoints.
    """
    from gpt.delivery import deliver_model
    from gpt.runs import find_checkpoint
    from gpt.store import check_tracking_uri, open_client, with_retries

    check_tracking_uri(tracking_uri)
    try:
        path = find_checkpoint(run_id, "best", tracking_uri, cache_dir)
    except UserError as exc:
        if "has no checkpoints/best.pt" not in str(exc):
            raise
        path = find_checkpoint(run_id, "last", tracking_uri, cache_dir)
    client = open_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gpt-model-") as folder:
        target = Path(folder) / "model"
        step = model_from_checkpoint(path, encoding, target)
        item = {"seq": 0, "kind": "model", "path": str(target), "register": register_as, "step": step}
        return with_retries(lambda: deliver_model(client, run_id, item, Path(folder)), attempts=5)


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
    from gpt.store import require_store, resolve_tracking_uri

    if not _MODEL_URI.match(uri):
        raise UserError(
            f"--model {uri!r}: give models:/NAME/VERSION, models:/NAME@ALIAS, models:/<model_id> or "
            "runs:/<run_id>/model"
        )
    store = resolve_tracking_uri(tracking_uri)
    require_store(store, ": pass --tracking-uri or set MLFLOW_TRACKING_URI")
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
