"""Reading a grid back from MLflow: the parent run, its nested children, and the runs it reuses from other grids.

fetch_grid() is the only reader of the tracking store in the analysis: everything after it works on
the plain RunData and GridData it returns, so it is tested on synthetic grids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation.identity import GRID_ID_TAG, read_reuse_tags
from gpt.errors import UserError

METRICS = ("val_loss", "train_loss", "tokens_seen", "wall_seconds", "tokens_per_second")
STEP_METRIC = "train_loss_step"  # logged every train.log_every_steps optimizer steps, step = global step


@dataclass
class RunData:
    """One child run: where it sits in the grid and its curves (index: epoch, 1-based; NaN where not logged)."""

    run_id: str
    name: str
    status: str
    cell_id: str
    seed: str
    levels: dict[str, str]  # factor key -> level label, e.g. {"data.stride": "0.5x"}
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(METRICS), dtype=float))
    params: dict[str, str] = field(default_factory=dict)
    steps: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))  # train_loss_step by global step
    tags: dict[str, str] = field(default_factory=dict)
    start_time: float = math.nan  # seconds since the epoch
    end_time: float = math.nan
    reused_from: str = ""  # the parent run of the grid that trained it, when this grid reuses it


@dataclass
class GridData:
    parent_run_id: str
    grid_name: str
    factors: list[str]
    base_levels: dict[str, str]  # the parent's ablation.base.<key> tags, as logged
    runs: list[RunData]  # FINISHED children and reused runs: the only ones that enter the statistics
    others: list[RunData]  # failed, killed or still running children: listed in the report only
    design: str = "grid"
    grid_id: str = ""
    experiment_id: str = ""


def _read_parent(client: MlflowClient, parent_run_id: str) -> Run:
    if not re.fullmatch(r"[\w-]+", parent_run_id):
        raise UserError(f"run id {parent_run_id!r} is malformed; pass the parent run id shown by the ablation")
    try:
        return client.get_run(parent_run_id)
    except MlflowException as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot read run {parent_run_id} from {client.tracking_uri}: {reason}") from None


def _children(client: MlflowClient, parent: Run) -> list[Run]:
    children, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        children.extend(page)
        token = page.token
        if not token:
            return children


def _factors(parent: Run, children: list[Run]) -> list[str]:
    """The grid's factors: the parent's list; for parents that have none, every factor a child names."""
    listed = [k for k in parent.data.tags.get("ablation.factors", "").split(",") if k]
    if listed or "ablation.factors" in parent.data.tags:
        return listed
    factors: list[str] = []
    for child in children:
        tags = child.data.tags
        named = [k for k in tags.get("ablation.factors", "").split(",") if k]
        for key in named + sorted(k[len("factor.") :] for k in tags if k.startswith("factor.")):
            if key not in factors:
                factors.append(key)
    return factors


def _run_data(client: MlflowClient, run: Run, levels: dict[str, str], seed: str, with_curves: bool) -> RunData:
    tags, info = run.data.tags, run.info
    data = RunData(
        run_id=info.run_id,
        name=info.run_name or info.run_id,
        status=info.status,
        cell_id=tags.get("ablation.cell_id", ""),
        seed=seed,
        levels=levels,
        params=dict(run.data.params),
        tags=dict(tags),
        start_time=info.start_time / 1000 if info.start_time else math.nan,
        end_time=info.end_time / 1000 if info.end_time else math.nan,
    )
    if with_curves:
        data.curves = _curves(client, info.run_id)
        data.steps = _history(client, info.run_id, STEP_METRIC)
    return data


def fetch_grid(parent_run_id: str, tracking_uri: str | None = None) -> GridData:
    """The parent run's nested children and reused runs, with their tags, params and metric histories."""
    client = MlflowClient(tracking_uri)
    parent = _read_parent(client, parent_run_id)
    children = _children(client, parent)
    reused = read_reuse_tags(parent.data.tags)
    if not children and not reused:
        raise UserError(f"run {parent_run_id} has no nested child runs; pass the parent run of an ablation grid")
    prefix = "ablation.base."
    base = {k[len(prefix) :]: v for k, v in parent.data.tags.items() if k.startswith(prefix)}
    factors = _factors(parent, children)
    runs, others = [], []
    for child in children:
        tags, params = child.data.tags, child.data.params
        # a run without a factor's tag ran that factor at the base value
        levels = {f: tags.get(f"factor.{f}") or base.get(f) or params.get(f, "") for f in factors}
        seed = tags.get("ablation.seed", params.get("train.seed", ""))
        finished = child.info.status == "FINISHED"
        (runs if finished else others).append(_run_data(client, child, levels, seed, finished))
    done = {r.cell_id for r in runs}
    for cell_id, entry in reused.items():
        if cell_id in done:  # the cell finished here as well (a shard trained it before seeing the reuse)
            continue
        try:
            run = client.get_run(entry["run_id"])
        except MlflowException:
            continue  # deleted since: the cell shows as missing
        levels = {f: str(entry.get("levels", {}).get(f, base.get(f, ""))) for f in factors}
        data = _run_data(client, run, levels, str(entry.get("seed", "")), True)
        data.reused_from = run.data.tags.get("mlflow.parentRunId", "")
        runs.append(data)
    tags = parent.data.tags
    return GridData(
        parent_run_id,
        tags.get("ablation.grid", ""),
        factors,
        base,
        runs,
        others,
        design=tags.get("ablation.design", "grid"),
        grid_id=tags.get(GRID_ID_TAG, ""),
        experiment_id=parent.info.experiment_id,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> pd.Series:
    """A metric's values by step; a resumed run may log a step again: the last value wins."""
    latest: dict[int, float] = {}
    for point in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        latest[point.step] = point.value
    return pd.Series(latest, dtype=float).sort_index()


def _curves(client: MlflowClient, run_id: str) -> pd.DataFrame:
    curves = pd.DataFrame({key: _history(client, run_id, key) for key in METRICS}).sort_index()
    curves.index.name = "epoch"
    return curves
