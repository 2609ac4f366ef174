"""Running a grid: one parent MLflow run, a nested child run per cell, resumable, on many processes and machines.

Which cells a worker may train is settled by claims on the parent run (gpt.ablation.claims); this
process's shard of the cells, and each worker process's GPU and CPU threads, by gpt.ablation.workers.

The parent. Shards starting together may each create the grid's parent run. The oldest parent
(start time, then run id) is the grid's and the others are deleted by their creators. A parent is
trusted only once it is PARENT_SETTLE_S old, so that a parent whose creation was in flight when we
looked has reached the store; this assumes a run's creation is stored within that time of its
client-side start time, and that the machines' clocks agree to well within it (NTP).

The end. When a process has run its share, it reads the whole grid back from the store. While any
cell is RUNNING or UNTRIED (other shards at work or yet to start) the parent stays RUNNING; the
process that sees the grid complete writes the report and ends the parent: FINISHED, or FAILED if a
cell failed. Two shards that finish at the same moment may both do so, which is harmless.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.entities import Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation.claims import (
    CLAIM_TAG,
    CellState,
    cell_state,
    grid_states,
    leave_alone,
    new_token,
    record_failure,
    take_claim,
)
from gpt.ablation.grid import Cell, GridSpec, SkippedCell
from gpt.ablation.workers import gpu_slots, shard_cells, worker_pool
from gpt.errors import UserError
from gpt.job import JobOptions, check_run_name, prepare, train
from gpt.store import check_tracking_uri, ensure_experiment, open_client, with_retries

PARENT_SETTLE_S = 5.0


@dataclass
class RunnerOptions:
    experiment: str
    tracking_uri: str
    cache_dir: Path
    tokenizer_file: str | None = None
    workers: int = 1
    gpus: list[int] = field(default_factory=list)  # indices into the visible GPUs ($CUDA_VISIBLE_DEVICES)
    per_gpu: int = 1
    shard: tuple[int, int] = (0, 1)  # (i, n): this process runs cells whose index % n == i
    echo: Callable[[str], None] = print
    settle_s: float = PARENT_SETTLE_S
    started: float = field(default_factory=time.time)  # cells that failed after this were tried in this round


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (done before, or claimed by another worker)
    run_id: str = ""
    best_val_loss: float = float("nan")
    message: str = ""
    seconds: float = 0.0


@dataclass
class GridOutcome:
    parent_run_id: str
    outcomes: list[CellOutcome]  # this process's cells
    states: dict[str, CellState]  # every cell of the grid, by cell id, read back at the end
    cells: list[Cell]

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status in ("FAILED", "KILLED")]

    @property
    def waiting(self) -> list[Cell]:
        """Cells still running elsewhere or not yet started: the grid is not complete."""
        return [c for c in self.cells if self.states[c.cell_id].status in ("RUNNING", "UNTRIED")]

    @property
    def complete(self) -> bool:
        return not self.waiting


# ---------------------------------------------------------------- the parent run


def find_parents(client: MlflowClient, experiment_id: str, grid_name: str) -> list[Run]:
    """The grid's active parent runs in the experiment, oldest first (start time, then run id)."""
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`ablation.grid` = '{grid_name}' and tags.`ablation.role` = 'parent'",  # check_run_name: no quotes
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def open_parent(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> str:
    """Find or create the grid's parent run (resuming reuses it); with shards starting together, agree on one."""
    check_tracking_uri(options.tracking_uri)
    check_run_name(spec.name)
    client = open_client(options.tracking_uri)
    experiment_id = _ensure_experiment(client, options.experiment)
    tags = {**spec.parent_tags(), "ablation.role": "parent", "mlflow.source.name": "ablate.py"}
    created = None
    while True:
        parents = find_parents(client, experiment_id, spec.name)
        if not parents:
            created = with_retries(lambda: client.create_run(experiment_id, run_name=spec.name, tags=tags)).info.run_id
            continue
        wait = parents[0].info.start_time / 1000 + options.settle_s - time.time()
        if wait <= 0:
            break
        time.sleep(wait)  # an older parent created at the same moment elsewhere may not be visible yet
    parent_id = parents[0].info.run_id
    if created is not None and created != parent_id:
        with_retries(lambda: client.delete_run(created))
    if created == parent_id:
        grid_text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
        with_retries(lambda: client.log_text(parent_id, grid_text, "grid.yaml"))
        params = {"design": spec.design, "factors": ",".join(spec.factor_keys), "seeds": ",".join(map(str, spec.seeds))}
        params.update(cells=str(len(cells)), skipped_cells=str(len(skipped)))
        for key, value in params.items():
            with_retries(lambda key=key, value=value: client.log_param(parent_id, key, value))
    else:
        with_retries(lambda: client.update_run(parent_id, status="RUNNING"))
    if skipped:
        lines = [f"{s.name}: {s.reason}" for s in skipped]
        with_retries(lambda: client.log_text(parent_id, "\n".join(lines) + "\n", "skipped_cells.txt"))
    return parent_id


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    """gpt.store.ensure_experiment, again if a shard starting at the same moment tagged the experiment first.

    MLflow's store upserts an experiment tag with a read, then an insert; of two processes tagging a new
    experiment at once, one fails on the table's unique key. The second try finds the tag and updates it.
    """
    try:
        return ensure_experiment(client, name)
    except MlflowException as exc:
        if not re.search(r"unique constraint|integrityerror|duplicate key", str(exc), re.IGNORECASE):
            raise
        return ensure_experiment(client, name)


def close_parent(tracking_uri: str, outcome: GridOutcome) -> str:
    """End a complete grid's parent: FINISHED, or FAILED (with failed_cells.txt) if a cell failed."""
    client = MlflowClient(tracking_uri)
    failed = [(c, outcome.states[c.cell_id]) for c in outcome.cells if outcome.states[c.cell_id].status == "FAILED"]
    if failed:
        lines = [f"{cell.name} ({cell.cell_id}): {state.detail}" for cell, state in failed]
        text = "\n".join(lines) + "\n"
        with_retries(lambda: client.log_text(outcome.parent_run_id, text, "failed_cells.txt"))
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    with_retries(lambda: client.set_terminated(outcome.parent_run_id, status))
    return status


# ---------------------------------------------------------------- running cells


def run_cell(cell: Cell, parent_id: str, experiment_id: str, options: RunnerOptions) -> CellOutcome:
    """Claim and train one cell (in this process); any failure is the cell's, never the grid's."""
    started = time.monotonic()
    client = MlflowClient(options.tracking_uri)
    reason = leave_alone(cell_state(client, experiment_id, parent_id, cell), options.started)
    if reason:
        return CellOutcome(cell, "SKIPPED", message=reason)
    token = new_token()
    tags = {**cell.tags(), CLAIM_TAG: token, "ablation.host": socket.gethostname(), "ablation.pid": str(os.getpid())}
    tags["mlflow.source.name"] = "ablate.py"
    job = JobOptions(
        experiment=options.experiment,
        run_name=cell.name,
        tracking_uri=options.tracking_uri,
        cache_dir=options.cache_dir,
        tokenizer_file=options.tokenizer_file,
        parent_run_id=parent_id,
        tags=tags,
        progress=False,
        echo=lambda line: None,
    )
    prepared, error, claimed = None, "", False
    try:  # reading and tokenizing the data comes before the claim, so that a claim turns into a run at once
        prepared = prepare(cell.config, job)
    except Exception as exc:
        error = _message(exc)
    try:
        reason = take_claim(client, experiment_id, parent_id, cell, token, options.started)
        if reason:
            return CellOutcome(cell, "SKIPPED", message=reason)
        claimed = True
        if prepared is not None:
            result = train(cell.config, job, prepared=prepared)
            seconds = time.monotonic() - started
            return CellOutcome(cell, result.status, result.run_id, result.best_val_loss, result.message, seconds)
    except Exception as exc:  # one broken cell must not stop the grid
        error = _message(exc)
    if claimed:
        try:
            record_failure(client, experiment_id, parent_id, cell, tags, error)
        except Exception as exc:
            error += f" (and recording the failure failed: {_message(exc)})"
    return CellOutcome(cell, "FAILED", message=error, seconds=time.monotonic() - started)


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def run_grid(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> GridOutcome:
    """Run this shard's cells, `workers` at a time; failures are recorded and the grid goes on.

    Ending the parent is left to the caller (close_parent, once the report is written), and only
    when the returned outcome is complete.
    """
    slots = gpu_slots(options.gpus, options.per_gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    parent_id = open_parent(spec, cells, skipped, options)
    client = MlflowClient(options.tracking_uri)
    experiment_id = with_retries(lambda: client.get_run(parent_id)).info.experiment_id
    mine = shard_cells(cells, options.shard)
    total, outcomes = len(mine), []
    options.echo(f"parent run: {parent_id}  ({total} of {len(cells)} cells here, {len(skipped)} skipped as invalid)")

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        loss = f"best val {outcome.best_val_loss:.4f}" if outcome.status == "FINISHED" else outcome.message
        position = f"[{len(outcomes)}/{total}]"
        options.echo(f"{position} {outcome.cell.name}: {outcome.status}  {loss}  ({outcome.seconds:.0f} s)")

    workers = len(slots) if slots else options.workers
    if workers <= 1 and not slots:
        for cell in mine:
            report(run_cell(cell, parent_id, experiment_id, options))
    else:
        context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
        gpu_queue = None
        if slots:
            gpu_queue = context.Queue()
            for slot in slots:
                gpu_queue.put(slot)
        with worker_pool(workers, gpu_queue) as pool:  # cores // workers threads each: no oversubscription
            worker_options = _picklable(options)
            futures = {pool.submit(run_cell, cell, parent_id, experiment_id, worker_options): cell for cell in mine}
            for future in concurrent.futures.as_completed(futures):
                try:
                    report(future.result())
                except Exception as exc:  # the worker process itself died (OOM killer, segfault)
                    report(CellOutcome(futures[future], "FAILED", message=f"worker died: {exc}"))
    states = grid_states(client, experiment_id, parent_id, cells)
    return GridOutcome(parent_id, outcomes, states, cells)


def _picklable(options: RunnerOptions) -> RunnerOptions:
    """Worker processes get the options without the parent's printing function."""
    return RunnerOptions(**{**options.__dict__, "echo": print})
