"""Which cells of a grid are taken: write-once claims on the grid's parent run, and each cell's state.

Before training a cell a worker claims it with one atomic write to the tracking store: the
parent run's param `claim.<cell id>.<n>` = a token naming the worker (host, pid, time, nonce). MLflow
params are write-once (the store rejects a different value for a logged key inside its transaction),
so of any number of workers that reach a cell at once, on any machines, exactly one holds attempt n.
The run the winner trains carries the same token in its tag `ablation.claim`. From the parent's
claims and the cell's child runs, a cell is
  DONE     when one of its runs FINISHED,
  RUNNING  while its latest claim's process is alive (one on another machine always counts as alive;
           a claim whose run never appeared counts as dead after CLAIM_START_S),
  FAILED   when that run FAILED or was KILLED, or its process died,
  UNTRIED  when nobody claimed it yet.
A cell that stands on a finished run of another grid with the same cell id (the parent's tag
ablation.reused.<cell id>, see gpt.ablation.reuse) is DONE as well.
A worker takes UNTRIED cells and cells that failed before its own process started (a grid run again
retries them), and leaves the others alone. So running a grid again skips finished cells, and shards
on many machines, or the same shard started twice, never train one cell twice.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation.grid import Cell, run_name
from gpt.ablation.identity import read_reuse_tags
from gpt.store import with_retries

CLAIM_START_S = 600.0  # a claim has become a run within seconds, unless its process died first
CLAIM_TRIES = 5
CLAIM_TAG = "ablation.claim"
_CLAIM_KEY = re.compile(r"claim\.([0-9a-f]+)\.(\d+)")


@dataclass
class CellState:
    """What the tracking store says about a cell (see the module docstring)."""

    status: str  # DONE | RUNNING | FAILED | UNTRIED
    next_attempt: int = 0
    run_id: str = ""
    detail: str = ""
    since: float = 0.0  # when the latest attempt started (epoch seconds)


def new_token() -> str:
    return f"{socket.gethostname()} {os.getpid()} {time.time():.3f} {uuid.uuid4().hex[:8]}"


def _process_alive(host: str, pid: str) -> bool:
    """Whether a process may still be working: only this machine's processes can be checked."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def judge(claims: dict[int, str], runs: list[Run], now: float | None = None) -> CellState:
    """A cell's state from its claims (attempt -> token) and its active child runs."""
    now = time.time() if now is None else now
    next_attempt = max(claims, default=-1) + 1
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return CellState("DONE", next_attempt, finished[0].info.run_id, f"finished in run {finished[0].info.run_id}")
    if claims:
        token = claims[max(claims)]
        held = [r for r in runs if r.data.tags.get(CLAIM_TAG) == token]
        if not held:
            host, pid, stamp = (token.split(" ") + ["", "", "0"])[:3]
            since = float(stamp) if re.fullmatch(r"[\d.]+", stamp) else 0.0
            if _process_alive(host, pid) and now - since < CLAIM_START_S:
                return CellState("RUNNING", next_attempt, "", f"claimed by {host} pid {pid}, starting", since)
            return CellState("FAILED", next_attempt, "", f"its process ({host} pid {pid}) ended before training", since)
        run = held[0]
    elif runs:
        run = max(runs, key=lambda r: r.info.start_time)  # a run from before claims were recorded
    else:
        return CellState("UNTRIED")
    tags, run_id, since = run.data.tags, run.info.run_id, run.info.start_time / 1000
    if run.info.status in ("RUNNING", "SCHEDULED"):
        host, pid = tags.get("ablation.host", ""), tags.get("ablation.pid", "")
        if _process_alive(host, pid):
            return CellState("RUNNING", next_attempt, run_id, f"claimed by run {run_id} on {host}", since)
        return CellState("FAILED", next_attempt, run_id, f"run {run_id}: its process ({host} pid {pid}) died", since)
    error = tags.get("ablation.error", "")
    detail = f"run {run_id} {run.info.status}{': ' if error else ''}{error}"
    return CellState("FAILED", next_attempt, run_id, detail, since)


def _claims(parent: Run) -> dict[str, dict[int, str]]:
    claims: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for key, value in parent.data.params.items():
        match = _CLAIM_KEY.fullmatch(key)
        if match:
            claims[match[1]][int(match[2])] = value
    return claims


def search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = with_retries(
            lambda token=token: client.search_runs(
                [experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, page_token=token
            )
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _judge_cell(parent: Run, cell_id: str, runs: list[Run]) -> CellState:
    """judge(), except that a cell standing on a finished run of another grid (gpt.ablation.reuse) is DONE."""
    state = judge(_claims(parent).get(cell_id, {}), runs)
    reused = read_reuse_tags(parent.data.tags).get(cell_id)
    if reused is not None and state.status != "DONE":
        run_id = reused["run_id"]
        return CellState("DONE", state.next_attempt, run_id, f"reused run {run_id} of another grid (same cell id)")
    return state


def cell_state(client: MlflowClient, experiment_id: str, parent_id: str, cell: Cell) -> CellState:
    parent = with_retries(lambda: client.get_run(parent_id))
    query = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`ablation.cell_id` = '{cell.cell_id}'"
    return _judge_cell(parent, cell.cell_id, search_all(client, experiment_id, query))


def grid_states(client: MlflowClient, experiment_id: str, parent_id: str, cells: list[Cell]) -> dict[str, CellState]:
    """Every cell's state, from one read of the parent and its children."""
    parent = with_retries(lambda: client.get_run(parent_id))
    runs: dict[str, list[Run]] = collections.defaultdict(list)
    for run in search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        runs[run.data.tags.get("ablation.cell_id", "")].append(run)
    return {c.cell_id: _judge_cell(parent, c.cell_id, runs[c.cell_id]) for c in cells}


def end_dead_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list[str]:
    """End FAILED the grid's child runs left RUNNING by a process of this machine that is gone (a SIGKILLed worker).

    Runs of other machines cannot be checked and are left alone. Returns the ended run ids.
    """
    query = f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"
    ended = []
    for run in search_all(client, experiment_id, query):
        host, pid = run.data.tags.get("ablation.host", ""), run.data.tags.get("ablation.pid", "")
        if not host or _process_alive(host, pid):  # no host tag: nothing to check it by
            continue
        message = f"its process ({host} pid {pid}) died while training; the run was ended when the grid ran again"
        run_id = run.info.run_id
        with_retries(lambda run_id=run_id, message=message: client.set_tag(run_id, "ablation.error", message))
        with_retries(lambda run_id=run_id: client.set_terminated(run_id, "FAILED"))
        ended.append(run_id)
    return ended


def leave_alone(state: CellState, started: float) -> str | None:
    """Why a worker that started at `started` must not take the cell, or None if it may."""
    if state.status in ("DONE", "RUNNING"):
        return state.detail
    if state.status == "FAILED" and state.since >= started:
        return f"failed in this round: {state.detail}"  # another process of this round tried it
    return None


def take_claim(
    client: MlflowClient, experiment_id: str, parent_id: str, cell: Cell, token: str, started: float
) -> str | None:
    """Claim the cell's next attempt for `token`: None if it is ours, else why not."""
    for _ in range(CLAIM_TRIES):
        state = cell_state(client, experiment_id, parent_id, cell)
        reason = leave_alone(state, started)
        if reason:
            return reason
        key = f"claim.{cell.cell_id}.{state.next_attempt}"
        try:
            with_retries(lambda key=key: client.log_param(parent_id, key, token))
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":  # that one: another worker took this attempt
                raise
        if with_retries(lambda: client.get_run(parent_id)).data.params.get(key) == token:
            return None
    return f"lost {CLAIM_TRIES} claims in a row"


def record_failure(
    client: MlflowClient, experiment_id: str, parent_id: str, cell: Cell, tags: dict[str, str], message: str
) -> None:
    """A claimed cell that failed before its run existed gets a FAILED run saying why (seen in the UI, on resume)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{CLAIM_TAG}` = '{tags[CLAIM_TAG]}'"
    if search_all(client, experiment_id, query):
        return  # training had opened its run, and ended it FAILED
    tags = {
        **tags,
        "mlflow.parentRunId": parent_id,
        "mlflow.source.name": "ablate.py",
        "ablation.error": message[:5000],
    }
    run = with_retries(lambda: client.create_run(experiment_id, run_name=run_name(cell), tags=tags))
    with_retries(lambda: client.set_terminated(run.info.run_id, "FAILED"))
