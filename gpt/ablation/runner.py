"""Running a grid: one parent MLflow run, a nested child run per cell, resumable, on many processes and machines.

Which cells a worker may train is settled by claims on the parent run (gpt.ablation.claims); this
process's shard of the cells, and each worker process's GPU and CPU threads, by gpt.ablation.workers.

The parent. A grid's parent run carries the grid's identity (gpt.ablation.identity) in its tag
ablation.grid_id, and is found by it: two different grids never share a parent, whatever their
names, and a parent made before grids had an identity is never reused. Shards starting together
may each create the grid's parent run. The oldest parent (start time, then run id) is the grid's
and the others are deleted by their creators. A parent is trusted only once it is PARENT_SETTLE_S
old, so that a parent whose creation was in flight when we looked has reached the store; this
assumes a run's creation is stored within that time of its client-side start time, and that the
machines' clocks agree to well within it (NTP). Before running, child runs left RUNNING by a dead
worker of this machine are ended FAILED, and cells that another grid in the experiment already
trained (same cell id, same data bytes) stand on that run (gpt.ablation.reuse).

The end. When a process has run its share, it reads the whole grid back from the store. While any
cell is RUNNING or UNTRIED (other shards at work or yet to start) the parent stays RUNNING; the
process that sees the grid complete writes the report and ends the parent: FINISHED, or FAILED if a
cell failed. Two shards that finish at the same moment may both do so, which is harmless.
Ctrl-C or SIGTERM stops the grid (gpt.ablation.stopping): running cells end KILLED with a
checkpoint, no other cell starts, and the caller ends the parent KILLED (stop_parent); running
the grid again goes on from there.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import queue
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

from gpt.ablation import stopping
from gpt.ablation.claims import (
    CLAIM_TAG,
    CellState,
    cell_state,
    end_dead_runs,
    grid_states,
    leave_alone,
    new_token,
    record_failure,
    take_claim,
)
from gpt.ablation.grid import Cell, GridSpec, SkippedCell, run_name
from gpt.ablation.identity import GRID_ID_TAG, grid_id
from gpt.ablation.resumable import hand_over, killed_run
from gpt.ablation.reuse import reuse_finished
from gpt.ablation.workers import gpu_slots, init_worker, shard_cells, worker_pool
from gpt.errors import UserError
from gpt.job import JobOptions, JobResult, Prepared, check_grid_name, prepare, train
from gpt.resume import Resumption
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
    log_model: bool = True  # each cell logs its best model as an MLflow Model (ablate.py run --no-log-model)
    digests: dict[str, list[str]] = field(default_factory=dict)  # cell id -> sha256 of its data files


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (done before, claimed by another worker, or the grid stopped)
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
    stopped: int = 0  # the signal that stopped the grid (Ctrl-C: SIGINT), 0 if none did
    reused: dict[str, str] = field(default_factory=dict)  # cell id -> run id of another grid's finished run

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status in ("FAILED", "KILLED")]

    @property
    def waiting(self) -> list[Cell]:
        """Cells still running elsewhere or not yet started: the grid is not complete."""
        return [c for c in self.cells if self.states[c.cell_id].status in ("RUNNING", "UNTRIED")]

    @property
    def complete(self) -> bool:
        return not self.waiting and not self.stopped


# ---------------------------------------------------------------- the parent run


def find_parents(client: MlflowClient, experiment_id: str, identity: str) -> list[Run]:
    """The grid's active parent runs in the experiment, oldest first (start time, then run id)."""
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`{GRID_ID_TAG}` = '{identity}' and tags.`ablation.role` = 'parent'",  # hex digits: no quotes
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def open_parent(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> str:
    """Find or create the grid's parent run (resuming reuses it); with shards starting together, agree on one."""
    check_tracking_uri(options.tracking_uri)
    check_grid_name(spec.name)
    client = open_client(options.tracking_uri)
    experiment_id = _ensure_experiment(client, options.experiment)
    identity = grid_id(spec, options.digests)
    tags = {**spec.parent_tags(), GRID_ID_TAG: identity, "ablation.role": "parent", "mlflow.source.name": "ablate.py"}
    created = None
    while True:
        parents = find_parents(client, experiment_id, identity)
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
        params.update(cells=str(len(cells)), skipped_cells=str(len(skipped)), grid_id=identity)
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
    """End a complete grid's parent: FINISHED, or FAILED (with failed_cells.txt) if a cell failed.

    A failed_cells.txt left by an earlier round whose failed cells have since finished is removed.
    """
    client = MlflowClient(tracking_uri)
    failed = [(c, outcome.states[c.cell_id]) for c in outcome.cells if outcome.states[c.cell_id].status == "FAILED"]
    if failed:
        lines = [f"{cell.name} ({cell.cell_id}): {state.detail}" for cell, state in failed]
        text = "\n".join(lines) + "\n"
        with_retries(lambda: client.log_text(outcome.parent_run_id, text, "failed_cells.txt"))
    else:
        _remove_stale_failures(client, outcome.parent_run_id)
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    with_retries(lambda: client.set_terminated(outcome.parent_run_id, status))
    return status


def _remove_stale_failures(client: MlflowClient, parent_id: str) -> None:
    """Delete failed_cells.txt from the parent; overwrite it where the artifact store cannot delete."""
    if "failed_cells.txt" not in {a.path for a in with_retries(lambda: client.list_artifacts(parent_id))}:
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(with_retries(lambda: client.get_run(parent_id)).info.artifact_uri)
    try:
        repository.delete_artifacts("failed_cells.txt")
    except (NotImplementedError, MlflowException, OSError):
        text = "no failed cells: every cell finished in a later round\n"
        with_retries(lambda: client.log_text(parent_id, text, "failed_cells.txt"))


def stop_parent(tracking_uri: str, parent_id: str) -> None:
    """End a stopped grid's parent KILLED; running the grid again finds it and goes on."""
    client = MlflowClient(tracking_uri)
    with_retries(lambda: client.set_terminated(parent_id, RunStatus.to_string(RunStatus.KILLED)))


# ---------------------------------------------------------------- running cells


_events = None  # in a worker process: the queue on which run_cell announces a cell's start to the grid's process


def _announce(line: str, options: RunnerOptions) -> None:
    if _events is not None:
        _events.put(line)
    else:
        options.echo(line)


def _not_started(cell: Cell) -> CellOutcome:
    return CellOutcome(cell, "SKIPPED", message="not started: the grid is stopping")


def _job(cell: Cell, parent_id: str, options: RunnerOptions, token: str) -> JobOptions:
    tags = {**cell.tags(), CLAIM_TAG: token, "ablation.host": socket.gethostname(), "ablation.pid": str(os.getpid())}
    tags["mlflow.source.name"] = "ablate.py"
    return JobOptions(
        experiment=options.experiment,
        run_name=run_name(cell),
        tracking_uri=options.tracking_uri,
        cache_dir=options.cache_dir,
        tokenizer_file=options.tokenizer_file,
        parent_run_id=parent_id,
        tags=tags,
        progress=False,
        echo=lambda line: None,
        log_model=options.log_model,
    )


def run_cell(cell: Cell, parent_id: str, experiment_id: str, options: RunnerOptions) -> CellOutcome:
    """Claim and train one cell (in this process); any failure is the cell's, never the grid's.

    Once the grid is asked to stop (gpt.ablation.stopping) no cell is claimed or started; a cell that
    a stop left KILLED goes on from its checkpoint (gpt.ablation.resumable).
    """
    started = time.monotonic()
    client = MlflowClient(options.tracking_uri)
    if stopping.requested():
        return _not_started(cell)
    state = cell_state(client, experiment_id, parent_id, cell)
    reason = leave_alone(state, options.started)
    if reason:
        return CellOutcome(cell, "SKIPPED", message=reason)
    job = _job(cell, parent_id, options, new_token())
    prepared, error, claimed, resumption = None, "", False, None
    try:  # reading and tokenizing the data comes before the claim, so that a claim turns into a run at once
        resumption = killed_run(client, state, options.tracking_uri, options.cache_dir)
        cfg, payload = (resumption.cfg, resumption.payload) if resumption else (cell.config, None)
        prepared = prepare(cfg, job, payload)
    except Exception as exc:
        error = _message(exc)
    try:
        if stopping.requested():
            return _not_started(cell)
        reason = take_claim(client, experiment_id, parent_id, cell, job.tags[CLAIM_TAG], options.started)
        if reason:
            return CellOutcome(cell, "SKIPPED", message=reason)
        claimed = True
        if prepared is not None:
            result = _train(cell, prepared, job, resumption, client, options)
            seconds = time.monotonic() - started
            return CellOutcome(cell, result.status, result.run_id, result.best_val_loss, result.message, seconds)
    except Exception as exc:  # one broken cell must not stop the grid
        error = _message(exc)
    if claimed:
        try:
            record_failure(client, experiment_id, parent_id, cell, job.tags, error)
        except Exception as exc:
            error += f" (and recording the failure failed: {_message(exc)})"
    return CellOutcome(cell, "FAILED", message=error, seconds=time.monotonic() - started)


def _train(
    cell: Cell,
    prepared: Prepared,
    job: JobOptions,
    resumption: Resumption | None,
    client: MlflowClient,
    options: RunnerOptions,
) -> JobResult:
    """Train a claimed cell, in a new run or going on in its stopped one; a signal that stops it stops the grid."""
    if resumption is None:
        _announce(f"start {run_name(cell)}", options)
        result = train(cell.config, job, prepared=prepared)
    else:
        run_id, payload = resumption.run_id, resumption.payload
        hand_over(client, run_id, job.tags)
        _announce(f"start {run_name(cell)} (resuming run {run_id} in epoch {payload['state']['epoch'] + 1})", options)
        result = train(resumption.cfg, job, prepared, resume_payload=payload, resume_run_id=run_id)
    if result.status == "KILLED":  # a signal reached the training (StopOnSignal): the grid stops too
        stopping.request(result.exit_code - 128 if result.exit_code > 128 else 2)
    return result


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def _settle(
    client: MlflowClient, experiment_id: str, parent_id: str, cells: list[Cell], options: RunnerOptions
) -> dict[str, str]:
    """Before running: end the runs of workers that died, and stand cells on finished runs of other grids."""
    for run_id in end_dead_runs(client, experiment_id, parent_id):
        options.echo(f"ended run {run_id} FAILED: the worker that trained it is gone")
    states = grid_states(client, experiment_id, parent_id, cells)
    reused = reuse_finished(client, experiment_id, parent_id, cells, states, options.digests)
    names = {c.cell_id: c for c in cells}
    for key, run in reused.items():
        options.echo(f"reused run {run.info.run_id} ({run.info.run_name}) for {run_name(names[key])}: same cell id")
    return {key: run.info.run_id for key, run in reused.items()}


def run_grid(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> GridOutcome:
    """Run this shard's cells, `workers` at a time; failures are recorded and the grid goes on.

    Ending the parent is left to the caller: close_parent (once the report is written) when the
    returned outcome is complete, stop_parent when a signal stopped it.
    """
    slots = gpu_slots(options.gpus, options.per_gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    parent_id = open_parent(spec, cells, skipped, options)
    client = MlflowClient(options.tracking_uri)
    experiment_id = with_retries(lambda: client.get_run(parent_id)).info.experiment_id
    options.echo(f"parent run: {parent_id}")
    reused = _settle(client, experiment_id, parent_id, cells, options)
    mine = [c for c in shard_cells(cells, options.shard) if c.cell_id not in reused]
    total, outcomes = len(mine), []
    where = f"in shard {options.shard[0]}/{options.shard[1]}" if options.shard[1] > 1 else "in this grid"
    options.echo(
        f"{total} of {len(cells)} cells to run {where} (finished ones are skipped), {len(reused)} reused from "
        f"another grid, {len(skipped)} skipped as invalid"
    )

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        loss = f"best val {outcome.best_val_loss:.4f}" if outcome.status == "FINISHED" else outcome.message
        position = f"[{len(outcomes)}/{total}]"
        options.echo(f"{position} {run_name(outcome.cell)}: {outcome.status}  {loss}  ({outcome.seconds:.0f} s)")

    workers = len(slots) if slots else options.workers
    with stopping.GridStop():
        try:
            if workers <= 1 and not slots:
                for cell in mine:
                    report(run_cell(cell, parent_id, experiment_id, options))
            else:
                _run_pool(mine, slots, workers, (parent_id, experiment_id), options, report)
        except KeyboardInterrupt:  # a second Ctrl-C: the workers exit at once too; the parent must still end
            stop_parent(options.tracking_uri, parent_id)
            raise
    states = grid_states(client, experiment_id, parent_id, cells)
    return GridOutcome(parent_id, outcomes, states, cells, stopped=stopping.requested(), reused=reused)


def _run_pool(
    mine: list[Cell],
    slots: list[str],
    workers: int,
    where: tuple[str, str],
    options: RunnerOptions,
    report: Callable[[CellOutcome], None],
) -> None:
    """Run the cells on `workers` spawned processes, printing each start as it happens.

    Once the grid is asked to stop, queued cells are cancelled and running ones end KILLED (stopping.GridStop).
    """
    context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
    gpu_queue = None
    if slots:
        gpu_queue = context.Queue()
        for slot in slots:
            gpu_queue.put(slot)
    events = context.Queue()
    # cores // workers threads each (gpt.threads): no oversubscription
    with worker_pool(workers, gpu_queue, _init_worker, (events,)) as pool:
        worker_options = _picklable(options)
        futures = {pool.submit(stopping.run_in_cell, run_cell, cell, *where, worker_options): cell for cell in mine}
        while futures:
            done, _ = concurrent.futures.wait(futures, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
            _drain(events, options.echo)
            if stopping.requested():
                for future in [f for f in futures if f.cancel()]:
                    report(_not_started(futures.pop(future)))
            for future in done:
                cell = futures.pop(future)
                try:
                    report(future.result())
                except Exception as exc:  # the worker process itself died (OOM killer, segfault, a second Ctrl-C)
                    report(CellOutcome(cell, "FAILED", message=f"worker died: {exc}"))
        _drain(events, options.echo)


def _drain(events: multiprocessing.Queue, echo: Callable[[str], None]) -> None:
    while True:
        try:
            echo(events.get_nowait())
        except queue.Empty:
            return


def _init_worker(gpu_queue: multiprocessing.Queue | None, threads: int, events: multiprocessing.Queue) -> None:
    """A worker's set-up (gpt.ablation.workers.init_worker), its signals (own process group) and event queue."""
    global _events
    stopping.worker_signals()
    _events = events
    init_worker(gpu_queue, threads)


def _picklable(options: RunnerOptions) -> RunnerOptions:
    """Worker processes get the options without the parent's printing function."""
    return RunnerOptions(**{**options.__dict__, "echo": print})
