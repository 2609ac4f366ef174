"""Running a grid: one parent MLflow run, a nested child run per cell, resumable, in parallel.

A cell's identity is its cell id (hash of resolved config + seed). Before training a cell, a worker
*claims* it by creating the child run and then looking for other child runs of the same cell: the
oldest claim wins (start time, then run id), a FINISHED one means the cell is done, and a loser
deletes its own claim. So a grid run again skips finished cells, re-runs failed or interrupted ones,
and two processes (shards on two machines) never both train one cell.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.entities import RunStatus, ViewType
from mlflow.tracking import MlflowClient

from gpt.ablation.grid import Cell, GridSpec, SkippedCell
from gpt.errors import UserError
from gpt.job import JobOptions, check_run_name, start_run_in, train
from gpt.tracking import check_tracking_uri, ensure_experiment, with_retries


@dataclass
class RunnerOptions:
    experiment: str
    tracking_uri: str
    cache_dir: Path
    tokenizer_file: str | None = None
    workers: int = 1
    gpus: list[int] = field(default_factory=list)
    per_gpu: int = 1
    shard: tuple[int, int] = (0, 1)  # (i, n): this process runs cells whose index % n == i
    echo: Callable[[str], None] = print


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (done before or claimed by another worker)
    run_id: str = ""
    best_val_loss: float = float("nan")
    message: str = ""
    seconds: float = 0.0


@dataclass
class GridOutcome:
    parent_run_id: str
    outcomes: list[CellOutcome]

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status in ("FAILED", "KILLED")]


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """A deterministic share of the cells: by position in the (ordered, stable) cell list."""
    index, count = shard
    return [cell for position, cell in enumerate(cells) if position % count == index]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def find_parent(client: MlflowClient, experiment_id: str, grid_name: str) -> str | None:
    """The newest parent run of this grid in the experiment, to resume into."""
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`ablation.grid` = '{grid_name}' and tags.`ablation.role` = 'parent'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
    )
    return runs[0].info.run_id if runs else None


def open_parent(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> str:
    """Find or create the grid's parent run (resuming reuses it) and record the grid on it."""
    check_tracking_uri(options.tracking_uri)
    client = MlflowClient(options.tracking_uri)
    check_run_name(spec.name)
    experiment_id = ensure_experiment(client, options.experiment)
    parent_id = find_parent(client, experiment_id, spec.name)
    if parent_id is None:
        tags = {**spec.parent_tags(), "ablation.role": "parent", "mlflow.source.name": "ablate.py"}
        parent_id = start_run_in(client, experiment_id, spec.name, tags)
        grid_text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
        with_retries(lambda: client.log_text(parent_id, grid_text, "grid.yaml"))
        params = {"design": spec.design, "factors": ",".join(spec.factor_keys), "seeds": ",".join(map(str, spec.seeds))}
        params["cells"] = str(len(cells))
        params["skipped_cells"] = str(len(skipped))
        for key, value in params.items():
            with_retries(lambda key=key, value=value: client.log_param(parent_id, key, value))
    else:
        with_retries(lambda: client.update_run(parent_id, status="RUNNING"))
    if skipped:
        lines = [f"{s.name}: {s.reason}" for s in skipped]
        with_retries(lambda: client.log_text(parent_id, "\n".join(lines) + "\n", "skipped_cells.txt"))
    return parent_id


def cell_runs(client: MlflowClient, experiment_id: str, parent_id: str, cell: Cell) -> list:
    return with_retries(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`ablation.cell_id` = '{cell.cell_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
        )
    )


def claim_is_live(run) -> bool:
    """A RUNNING claim counts unless its process is known dead (same host, pid gone)."""
    tags = run.data.tags
    if tags.get("ablation.host") != socket.gethostname():
        return True  # can't see another machine's processes: assume it is still training
    try:
        os.kill(int(tags.get("ablation.pid", "0")), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def claim(client: MlflowClient, experiment_id: str, parent_id: str, cell: Cell, mine: str) -> str | None:
    """None if run `mine` may train the cell, else why not: the cell finished already, or an older
    live claim exists. Every claimant sees the same order (start time, run id), so one wins."""
    me = with_retries(lambda: client.get_run(mine)).info
    for run in cell_runs(client, experiment_id, parent_id, cell):
        if run.info.run_id == mine:
            continue
        if run.info.status == "FINISHED":
            return f"already finished in run {run.info.run_id}"
        older = (run.info.start_time, run.info.run_id) < (me.start_time, me.run_id)
        if run.info.status == "RUNNING" and older and claim_is_live(run):
            return f"claimed by run {run.info.run_id}"
    return None


def run_cell(cell: Cell, parent_id: str, options: RunnerOptions) -> CellOutcome:
    """Claim and train one cell (in this process)."""
    started = time.monotonic()
    client = MlflowClient(options.tracking_uri)
    experiment_id = ensure_experiment(client, options.experiment)
    done = [r for r in cell_runs(client, experiment_id, parent_id, cell) if r.info.status == "FINISHED"]
    if done:
        return CellOutcome(cell, "SKIPPED", done[0].info.run_id, message="finished earlier")
    job = JobOptions(
        experiment=options.experiment,
        run_name=cell.name,
        tracking_uri=options.tracking_uri,
        cache_dir=options.cache_dir,
        tokenizer_file=options.tokenizer_file,
        parent_run_id=parent_id,
        tags={**cell.tags(), "ablation.host": socket.gethostname(), "ablation.pid": str(os.getpid())},
        progress=False,
        echo=lambda line: None,
    )

    def check_claim(run_id: str) -> str | None:
        return claim(client, experiment_id, parent_id, cell, run_id)

    try:
        result = train(cell.config, job, claim=check_claim)
    except UserError as exc:
        return CellOutcome(cell, "FAILED", message=str(exc), seconds=time.monotonic() - started)
    except Exception as exc:  # one broken cell must not stop the grid
        message = f"{type(exc).__name__}: {exc}"
        return CellOutcome(cell, "FAILED", message=message, seconds=time.monotonic() - started)
    if result.status == "CLAIMED":
        return CellOutcome(cell, "SKIPPED", result.run_id, message=result.message)
    return CellOutcome(
        cell, result.status, result.run_id, result.best_val_loss, result.message, time.monotonic() - started
    )


def _worker_init(gpu_queue: multiprocessing.Queue | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if gpu_queue is not None:  # each worker process owns one GPU slot for its lifetime
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


def run_grid(spec: GridSpec, cells: list[Cell], skipped: list[SkippedCell], options: RunnerOptions) -> GridOutcome:
    """Run this shard's cells, `workers` at a time; failures are recorded and the grid goes on."""
    parent_id = open_parent(spec, cells, skipped, options)
    mine = shard_cells(cells, options.shard)
    total, outcomes = len(mine), []
    options.echo(f"parent run: {parent_id}  ({total} cells here, {len(skipped)} skipped as invalid)")

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        loss = f"best val {outcome.best_val_loss:.4f}" if outcome.status == "FINISHED" else outcome.message
        position = f"[{len(outcomes)}/{total}]"
        options.echo(f"{position} {outcome.cell.name}: {outcome.status}  {loss}  ({outcome.seconds:.0f} s)")

    slots = [gpu for gpu in options.gpus for _ in range(options.per_gpu)]
    workers = len(slots) if slots else options.workers
    if workers <= 1 and not slots:
        for cell in mine:
            report(run_cell(cell, parent_id, options))
    else:
        context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
        gpu_queue = None
        if slots:
            gpu_queue = context.Queue()
            for slot in slots:
                gpu_queue.put(slot)
        threads = max(1, (os.cpu_count() or 1) // workers)
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init, initargs=(gpu_queue, threads)
        ) as pool:
            futures = {pool.submit(run_cell, cell, parent_id, _picklable(options)): cell for cell in mine}
            for future in concurrent.futures.as_completed(futures):
                try:
                    report(future.result())
                except Exception as exc:  # the worker process itself died (OOM killer, segfault)
                    report(CellOutcome(futures[future], "FAILED", message=f"worker died: {exc}"))
    finish_parent(options, parent_id, outcomes)
    return GridOutcome(parent_id, outcomes)


def _picklable(options: RunnerOptions) -> RunnerOptions:
    """Worker processes get the options without the parent's printing function."""
    return RunnerOptions(**{**options.__dict__, "echo": print})


def finish_parent(options: RunnerOptions, parent_id: str, outcomes: list[CellOutcome]) -> None:
    client = MlflowClient(options.tracking_uri)
    failed = [o for o in outcomes if o.status in ("FAILED", "KILLED")]
    if failed:
        lines = [f"{o.cell.name} ({o.cell.cell_id}): {o.status} {o.message}" for o in failed]
        with_retries(lambda: client.log_text(parent_id, "\n".join(lines) + "\n", "failed_cells.txt"))
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    with_retries(lambda: client.set_terminated(parent_id, status))
