"""Stopping a grid: Ctrl-C and SIGTERM stop every cell with a checkpoint, start nothing, end the parent KILLED;
running again goes on in the same parent; runs of dead workers are ended; a stale failed_cells.txt goes."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_GRID, VERDICT, subprocess_env
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from gpt.ablation import runner
from gpt.ablation.claims import CellState, end_dead_runs
from gpt.ablation.grid import Cell
from gpt.config import Config

# 4 cells of 40 epochs: long enough to be stopped mid-training, on two workers
LONG_GRID = [
    *TINY_GRID,
    "--data", str(VERDICT),
    "--vary", "model.n_layers=1,2",
    "--seeds", "0,1",
    "--set", "train.epochs=40",
    "--set", "train.batch_size=8",
    "--workers", "2",
    "--name", "stoppable",
]  # fmt: skip


class Grid:
    """ablate.py run in a subprocess that leads its own process group, as a shell job does."""

    def __init__(self, uri: str, cwd: Path):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "ablate.py"), "run", *LONG_GRID, "--tracking-uri", uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=subprocess_env(),
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, count: int = 1, timeout: float = 240) -> list[str]:
        found, deadline = [], time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if text in line:
                found.append(line)
        if len(found) < count:
            self.process.kill()
            pytest.fail(f"no {count} lines with {text!r}; output:\n{''.join(self.output)}")
        return found

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"the grid did not stop within {timeout} s; output:\n{''.join(self.output)}")
        time.sleep(0.5)  # the reader thread drains the pipe
        return code, "".join(self.output)


def runs_of(uri: str, experiment: str = "stoppable") -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], "", run_view_type=ViewType.ACTIVE_ONLY)


def wait_for_training(uri: str, children: int, timeout: float = 240) -> None:
    """Until `children` child runs have logged an epoch: the cells are training, past their set-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trained = [r for r in runs_of(uri) if "ablation.cell_id" in r.data.tags and "val_loss" in r.data.metrics]
        if len(trained) >= children:
            return
        time.sleep(1)
    pytest.fail(f"{children} cells did not log an epoch within {timeout} s")


def wait_for_more_epochs(uri: str, logged: dict[str, int], timeout: float = 240) -> None:
    """Until one of the runs has logged more val_loss points than `logged` says: it went on training."""
    client, deadline = MlflowClient(uri), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(len(client.get_metric_history(run_id, "val_loss")) > n for run_id, n in logged.items()):
            return
        time.sleep(1)
    pytest.fail(f"no resumed run logged another epoch within {timeout} s")


def test_ctrl_c_stops_the_whole_grid_and_a_rerun_goes_on_in_the_same_parent(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    grid = Grid(uri, tmp_path)
    grid.wait_for("start n_layers=", count=2)
    wait_for_training(uri, 2)
    os.killpg(grid.process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the foreground process group
    code, output = grid.finish()
    assert code == 130, output
    assert "grid stopped by SIGINT: 2 running cell(s) ended KILLED" in output, output
    parents = [r for r in runs_of(uri) if r.data.tags.get("ablation.role") == "parent"]
    children = [r for r in runs_of(uri) if "ablation.cell_id" in r.data.tags]
    assert [p.info.status for p in parents] == ["KILLED"]
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"], "no other cell started"
    client = MlflowClient(uri)
    for child in children:
        saved = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in saved, f"{child.info.run_name} stopped without a checkpoint"
    assert output.count("start n_layers=") == 2

    again = Grid(uri, tmp_path)
    again.wait_for(f"parent run: {parents[0].info.run_id}")
    resumed = again.wait_for("start n_layers=", count=2)
    stopped = {c.info.run_id for c in children}
    assert all("(resuming run " in line for line in resumed), resumed
    assert {line.split("(resuming run ")[1].split()[0] for line in resumed} == stopped, "in their own runs"
    logged = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children}
    wait_for_more_epochs(uri, logged)
    os.kill(again.process.pid, signal.SIGTERM)  # a scheduler's SIGTERM reaches the grid's process only
    code, output = again.finish()
    assert code == 143, output
    assert "grid stopped by SIGTERM" in output
    assert [r.info.status for r in runs_of(uri) if r.data.tags.get("ablation.role") == "parent"] == ["KILLED"]
    children = [r for r in runs_of(uri) if "ablation.cell_id" in r.data.tags]
    assert [c.info.status for c in children] == ["KILLED", "KILLED"], "the workers stopped their cells too"
    assert {c.info.run_id for c in children} == stopped, "no new run: the stopped ones went on"


def test_a_run_left_running_by_a_dead_worker_is_ended_failed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dead", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="grid").info.run_id
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    tags = {"mlflow.parentRunId": parent, "ablation.cell_id": "abc", "ablation.host": host}
    dead = client.create_run(experiment, tags={**tags, "ablation.pid": str(gone.pid)}).info.run_id
    alive = client.create_run(experiment, tags={**tags, "ablation.pid": str(os.getpid())}).info.run_id
    assert end_dead_runs(client, experiment, parent) == [dead]
    assert client.get_run(dead).info.status == "FAILED" and "died" in client.get_run(dead).data.tags["ablation.error"]
    assert client.get_run(alive).info.status == "RUNNING", "a live worker's run is left alone"


def test_a_grid_that_completes_later_drops_its_stale_failed_cells_file(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stale", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="grid").info.run_id
    client.log_text(parent, "L1-seed0 (abc): run x FAILED\n", "failed_cells.txt")
    cell = Cell(Config(), {"model.n_layers": "1"}, 0, "abc", "L1-seed0")
    outcome = runner.GridOutcome(parent, [], {"abc": CellState("DONE")}, [cell])
    assert runner.close_parent(uri, outcome) == "FINISHED"
    assert "failed_cells.txt" not in {a.path for a in client.list_artifacts(parent)}


def test_workers_of_a_grid_killed_outright_stop_their_cells_with_a_checkpoint_and_exit(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) to the grid's process alone: its workers notice, end their cells KILLED with a
    checkpoint and exit, instead of training on as orphans and then waiting forever."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    grid = Grid(uri, tmp_path)
    grid.wait_for("start n_layers=", count=2)
    wait_for_training(uri, 2)
    workers = [int(r.data.tags["ablation.pid"]) for r in runs_of(uri) if "ablation.pid" in r.data.tags]
    assert len(workers) == 2 and grid.process.pid not in workers
    grid.process.send_signal(signal.SIGKILL)  # the grid's process only: the workers lead their own groups
    grid.finish()

    deadline = time.monotonic() + 120
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(_alive(pid) for pid in workers), "the orphaned workers should exit"
    children = [r for r in runs_of(uri) if "ablation.cell_id" in r.data.tags]
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"]
    client = MlflowClient(uri)
    for child in children:
        saved = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in saved, f"{child.info.run_name} stopped without a checkpoint"


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
