"""The grid's best model, registered: `ablate.py run --register-model NAME`.

The best cell is the one with the lowest mean best_val_loss over its seeds (finished runs only); of
its runs, the one with the lowest best_val_loss gives the model. That run's logged model (or, if it
logged none, its best checkpoint, logged now) becomes a new version of the registered model NAME.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from gpt.errors import UserError
from gpt.metrics import BEST_VAL_LOSS

CELL_TAG = "ablation.cell_id"


@dataclass(frozen=True)
class BestRun:
    cell_id: str
    run_id: str
    run_name: str
    cell_mean: float  # mean best_val_loss of the cell's finished runs (nats)
    best_val_loss: float  # this run's
    seeds: int  # finished runs in the cell


def best_run(parent_run_id: str, tracking_uri: str) -> BestRun:
    """The best cell's best-seed run among the grid's finished child runs.

    Raises UserError when no finished child run has a best_val_loss metric.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=50_000,
    )
    cells = defaultdict(list)
    for run in runs:
        loss = run.data.metrics.get(BEST_VAL_LOSS)
        if loss is not None and math.isfinite(loss):
            cells[run.data.tags.get(CELL_TAG, run.info.run_id)].append((loss, run))
    if not cells:
        raise UserError(f"grid {parent_run_id} has no finished run with a {BEST_VAL_LOSS} metric: nothing to register")
    cell_id, members = min(cells.items(), key=lambda item: statistics.fmean(loss for loss, _ in item[1]))
    loss, run = min(members, key=lambda member: member[0])
    mean = statistics.fmean(value for value, _ in members)
    return BestRun(cell_id, run.info.run_id, run.info.run_name, mean, loss, len(members))


def register_best(parent_run_id: str, tracking_uri: str, name: str, tokenizer_file: str | None) -> tuple[BestRun, str]:
    """Register the grid's best model as a new version of `name`; returns the run and the version number."""
    from gpt.delivery import register, run_model_id
    from gpt.logged_model import log_run_model
    from gpt.store import open_client
    from gpt.tokenizer import get_encoding

    best = best_run(parent_run_id, tracking_uri)
    client = open_client(tracking_uri)
    model_id = run_model_id(client, best.run_id)
    if model_id is None:  # trained with --no-log-model (or before models were logged): log it now
        done = log_run_model(best.run_id, tracking_uri, get_encoding(tokenizer_file), name)
        return best, done["version"]
    return best, register(client, model_id, best.run_id, name)
