"""Cells that another grid already trained: a finished run with the same cell id and the same data bytes.

A cell id hashes everything that changes what a run learns (gpt.ablation.grid.cell_id), and the
run's logged data.file<i>.sha256 params must match the data this grid reads, so the reused run is
the very experiment the cell asks for. The parent records each reuse in its tag
ablation.reused.<cell id> (gpt.ablation.identity), which makes the cell DONE (gpt.ablation.claims)
and puts the run into the report (gpt.ablation.analysis), which lists it as reused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from gpt.ablation.claims import CellState, search_all
from gpt.ablation.grid import Cell
from gpt.ablation.identity import REUSED_TAG, reuse_tag_value
from gpt.store import with_retries


def logged_digests(params: Mapping[str, str]) -> list[str]:
    """The sha256 of each data file a training run logged (params data.file0.sha256, data.file1.sha256...)."""
    digests, i = [], 0
    while f"data.file{i}.sha256" in params:
        digests.append(params[f"data.file{i}.sha256"])
        i += 1
    return digests


def reuse_finished(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    cells: Sequence[Cell],
    states: Mapping[str, CellState],
    digests: Mapping[str, list[str]],
) -> dict[str, Run]:
    """For each cell not yet done here, the oldest finished run of another grid in the experiment that is
    the same experiment; recorded on the parent. Returns cell id -> reused run."""
    wanted = {c.cell_id: c for c in cells if states[c.cell_id].status in ("UNTRIED", "FAILED")}
    if not wanted:
        return {}
    runs = search_all(client, experiment_id, "attributes.status = 'FINISHED'")
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))  # the choice is the same in every shard
    chosen: dict[str, Run] = {}
    for run in runs:
        tags = run.data.tags
        key = tags.get("ablation.cell_id", "")
        if key not in wanted or key in chosen or tags.get("mlflow.parentRunId") == parent_id:
            continue
        if logged_digests(run.data.params) == digests[key]:
            chosen[key] = run
    for key, run in chosen.items():
        value = reuse_tag_value(run.info.run_id, wanted[key])
        with_retries(lambda key=key, value=value: client.set_tag(parent_id, REUSED_TAG + key, value))
    return chosen
