"""The MLflow calls behind the spool's richer items: a run's dataset inputs and its Logged Model.

gpt.tracking delivers every spooled item; this module does it for `datasets` (MlflowClient.log_inputs)
and `model` items, and registers model versions. A model item is a saved MLflow Model folder
(gpt.mlflow_model); delivering it takes the steps mlflow.pyfunc.log_model takes, with MlflowClient:
create the Logged Model (name `model`, source run, the run's params), record it as the run's output at
the epoch of its weights, upload the folder, mark it READY and, when asked, create a version of a
registered model. Each step done is written to model-<seq>.json beside the spool, so a delivery cut
short by an outage resumes where it stopped instead of leaving a second model behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.tracking import MlflowClient

CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
MODEL_NAME = "model"  # the Logged Model's name, so that runs:/<run_id>/model finds it
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS
_COLLISION = re.compile(r"unique constraint|duplicate key|integrityerror", re.IGNORECASE)


# ---------------------------------------------------------------- datasets


def dataset_inputs(records: list[dict[str, Any]]) -> list[DatasetInput]:
    """MLflow's DatasetInput entities for spooled records: name, digest, source_type, source, profile, context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(
            Dataset(r["name"], r["digest"], r["source_type"], r["source"], profile=r["profile"]),
            [InputTag(CONTEXT_TAG, r["context"])],
        )
        for r in records
    ]


def deliver_datasets(client: MlflowClient, run_id: str, records: list[dict[str, Any]], attempts: int = 5) -> None:
    """Log the records as the run's dataset inputs (MlflowClient.log_inputs); raises what MLflow raises.

    MLflow stores a dataset once per experiment, reading before inserting: runs that log the same new
    dataset at the same moment (a grid's workers) collide on the table's unique key, and all but one
    fail. The dataset exists then, so logging again links it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=dataset_inputs(records))
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _COLLISION.search(str(exc)):
                raise
            time.sleep(0.1 * (attempt + 1))


# ---------------------------------------------------------------- the model


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
    """Log (and register) a spooled model folder: item path, step, register (a name or None), seq.

    Returns the steps done (model_id, version). Raises what MLflow raises; called again (the sender
    retries), it goes on from the last step done.
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


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The newest READY Logged Model named `model` that the run logged, or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'"
    )
    ready = [m for m in models if m.status == "READY"]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None
