"""How long a planned cell will take, from runs of the same model shape already in the tracking store.

A plan runs nothing, so the only honest estimate is a measurement: the median training throughput
(the tokens_per_second metric, tokens/s of the last epoch) of finished runs whose model, window,
batch size and device match the cell. The time is then the cell's training tokens over that
throughput (evaluation and reporting are not counted). Cells with no such run say so.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from gpt.ablation.grid import Cell

# The params that decide a run's throughput on one device (the data only through the window length).
SHAPE_KEYS = (
    "model.vocab_size",
    "model.n_layers",
    "model.n_heads",
    "model.emb_dim",
    "model.context_length",
    "data.max_length",
    "train.batch_size",
    "train.precision",
)


@dataclass(frozen=True)
class Speed:
    tokens_per_second: float
    runs: int  # finished runs measured


def _shape(cell: Cell, device: str) -> tuple[tuple[str, str], ...]:
    flat = {**cell.config.flat(), "data.max_length": cell.config.window_length}
    return (*((key, str(flat[key])) for key in SHAPE_KEYS), ("device", device))


def measured_speeds(tracking_uri: str, cells: Sequence[Cell], device: str) -> dict[str, Speed]:
    """Cell id -> throughput measured on finished runs of the same shape on `device`; cells without one are absent.

    The store must exist (the caller checks it with gpt.store.check_tracking_uri): MLflow would create one.
    """
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return {}
    speeds: dict[tuple, Speed | None] = {}
    result = {}
    for cell in cells:
        shape = _shape(cell, device)
        if shape not in speeds:
            query = " and ".join(f"params.`{key}` = '{value}'" for key, value in shape)
            runs = client.search_runs(
                experiments, f"attributes.status = 'FINISHED' and {query}", ViewType.ACTIVE_ONLY, max_results=200
            )
            values = [r.data.metrics["tokens_per_second"] for r in runs if "tokens_per_second" in r.data.metrics]
            speeds[shape] = Speed(statistics.median(values), len(values)) if values else None
        if speeds[shape] is not None:
            result[cell.cell_id] = speeds[shape]
    return result
