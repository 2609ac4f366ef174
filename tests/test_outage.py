"""Tracking outages: a store that goes away never stops or stalls training, and every point arrives once.

Unit tests drive the Tracker against a real SQLite store behind a switch that fails calls exactly as a
stopped server does; end-to-end tests stop and restart a real `mlflow server` mid-run, and run three
trainings at once on one new SQLite file.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from click.testing import CliRunner
from conftest import RANKS, TINY_TRAIN, MlflowServer, Training
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import train
from gpt.env import quiet_mlflow_client
from gpt.errors import UserError
from gpt.store import is_transient, run_lock
from gpt.tracking import Spool, Tracker, replay

FAST = [*TINY_TRAIN, "--set", "data.stride=64", "--set", "train.batch_size=8", "--set", "train.log_every_steps=3"]
STEPS_PER_EPOCH = 8
needs_tokenizer = pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}")
EPOCH_METRICS = ("train_loss", "val_loss", "val_ppl", "tokens_seen", "epoch_seconds", "wall_seconds")


@pytest.fixture(scope="module")
def refused() -> MlflowException:
    """The very error MLflow's client raises for a server that is not there (no retries, as in train.py)."""
    quiet_mlflow_client()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MlflowException) as info:
        MlflowClient(f"http://127.0.0.1:{port}").log_batch("0" * 32, metrics=[Metric("m", 1.0, 0, 0)])
    return info.value


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite store for the unit tests (a new store's migrations take seconds)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    return uri, MlflowClient(uri).create_experiment("outage", artifact_location=(folder / "artifacts").as_uri())


@pytest.fixture
def store(experiment: tuple[str, str]) -> tuple[str, MlflowClient, str]:
    """The store's URI, a client, and a new RUNNING run."""
    uri, experiment_id = experiment
    client = MlflowClient(uri)
    return uri, client, client.create_run(experiment_id).info.run_id


class Switch:
    """A real client behind a switch: while `down`, every call fails as a stopped server's does.

    lose_answers > 0: that many calls reach the store and are applied, then fail as if the
    connection dropped before the answer came back, so the tracker sends them again.
    """

    def __init__(self, client: MlflowClient, error: Exception):
        self.client, self.error = client, error
        self.down, self.lose_answers = True, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise self.error
            result = method(*args, **kwargs)
            if self.lose_answers > 0:
                self.lose_answers -= 1
                raise self.error
            return result

        return call


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def log_epochs(tracker: Tracker, epochs: int) -> None:
    for epoch in range(1, epochs + 1):
        tracker.log_points([("train_loss", 10.0 - epoch, epoch, 1000 + epoch)])
        tracker.log_text(f"sample of epoch {epoch}", f"samples/epoch_{epoch:03d}.txt")


# ---------------------------------------------------------------- what counts as an outage


def test_a_stopped_server_and_a_locked_database_are_transient(refused: MlflowException) -> None:
    assert is_transient(refused), f"connection refused should be retried: {refused}"
    locked = sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(locked)
    # what MLflow's SQLAlchemy store turns a locked database into
    assert is_transient(MlflowException(message=locked, error_code="TEMPORARILY_UNAVAILABLE"))
    assert is_transient(MlflowException("API request to endpoint /x failed with error code 503 != 200"))


def test_refusals_and_local_file_errors_are_not_transient() -> None:
    assert not is_transient(
        MlflowException("Changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE")
    )
    assert not is_transient(FileNotFoundError(2, "No such file or directory"))
    assert not is_transient(PermissionError(13, "Permission denied"))


# ---------------------------------------------------------------- the spool


def test_spool_cuts_a_line_torn_by_a_crash_so_later_appends_read_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add({"kind": "metrics", "points": [["loss", 1.0, 1, 0]]})
    spool.add({"kind": "metrics", "points": [["loss", 2.0, 2, 0]]})
    with open(spool.journal, "a") as handle:
        handle.write('{"seq": 3, "kind": "metr')  # the process died here

    reopened = Spool(tmp_path)
    reopened.add({"kind": "metrics", "points": [["loss", 3.0, 3, 0]]})

    assert [item["seq"] for item in Spool(tmp_path).items()] == [1, 2, 3]
    assert Spool(tmp_path).items()[-1]["points"] == [["loss", 3.0, 3, 0]]


def test_runs_are_locked_against_a_second_process(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"run_id": "r", "tracking_uri": "sqlite:///x.db"}')
    Spool(tmp_path).add({"kind": "end", "status": "FINISHED"})
    with run_lock(tmp_path, "r"):
        with pytest.raises(UserError, match="in use by another process"):
            with run_lock(tmp_path, "r"):
                pass
        with pytest.raises(UserError, match="in use by another process"):
            replay(tmp_path)


# ---------------------------------------------------------------- the tracker


def test_logging_never_waits_and_every_point_arrives_once_when_the_store_returns(refused, store, tmp_path) -> None:
    uri, client, run_id = store
    switch = Switch(client, refused)
    tracker = Tracker(switch, run_id, tmp_path / "local", retry_wait=0.05)
    started = time.monotonic()
    log_epochs(tracker, 5)
    assert time.monotonic() - started < 2, "logging waited for the store"
    assert tracker.pending() == 10

    switch.lose_answers = 3  # applied, but the answers were lost: sent again, stored once
    switch.down = False

    assert tracker.close("FINISHED", timeout=60)
    assert steps(client, run_id, "train_loss") == [1, 2, 3, 4, 5]
    assert len(client.list_artifacts(run_id, "samples")) == 5
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not list((tmp_path / "local" / "outbox").iterdir()), "delivered copies should be cleared"


def test_close_gives_up_after_its_timeout_and_replay_sends_the_rest(refused, store, tmp_path) -> None:
    uri, client, run_id = store
    local = tmp_path / "local"
    (local / "run.json").parent.mkdir()
    (local / "run.json").write_text(f'{{"run_id": "{run_id}", "tracking_uri": "{uri}"}}')
    tracker = Tracker(Switch(client, refused), run_id, local, retry_wait=0.05)
    log_epochs(tracker, 3)
    started = time.monotonic()

    assert not tracker.close("FINISHED", timeout=0.5)
    assert time.monotonic() - started < 3
    assert client.get_run(run_id).info.status == "RUNNING"

    assert replay(local) == (run_id, 7, "FINISHED", 0)  # 3 metrics, 3 samples and the end; no unreadable line
    assert steps(client, run_id, "train_loss") == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert replay(local) == (run_id, 0, None, 0), "a second replay has nothing left to send"


def test_replay_ends_a_run_whose_process_died_as_failed(store, tmp_path) -> None:
    uri, client, run_id = store
    (tmp_path / "run.json").write_text(f'{{"run_id": "{run_id}", "tracking_uri": "{uri}"}}')
    Spool(tmp_path).add({"kind": "metrics", "points": [["train_loss", 9.0, 1, 1000]]})

    result = CliRunner().invoke(train.main, ["--replay", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"replayed 2 spooled items of run {run_id}; the run is now FAILED"
    assert steps(client, run_id, "train_loss") == [1]
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_resumed_run_does_not_send_the_end_its_killed_process_left(store, tmp_path) -> None:
    uri, client, run_id = store
    spool = Spool(tmp_path)
    spool.add({"kind": "metrics", "points": [["train_loss", 9.0, 1, 1000]]})
    spool.add({"kind": "end", "status": "KILLED"})  # queued by the killed process, never delivered

    tracker = Tracker(client, run_id, tmp_path, retry_wait=0.05)
    deadline = time.monotonic() + 30
    while not steps(client, run_id, "train_loss") and time.monotonic() < deadline:
        time.sleep(0.1)

    assert steps(client, run_id, "train_loss") == [1]
    assert client.get_run(run_id).info.status == "RUNNING"
    assert tracker.close("FINISHED", timeout=30)
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- end to end


def run_id_of(output: str) -> str:
    return re.search(r"^run_id: (\w+)$", output, re.MULTILINE).group(1)


def assert_every_point_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_METRICS:
        assert steps(client, run_id, key) == list(range(1, epochs + 1)), f"{key} of run {run_id}"
    total = epochs * STEPS_PER_EPOCH
    expected = [s for s in range(1, total + 1) if s % 3 == 0 or s % STEPS_PER_EPOCH == 0]
    assert steps(client, run_id, "train_loss_step") == expected, f"train_loss_step of run {run_id}"
    assert client.get_run(run_id).info.status == "FINISHED"
    names = {a.path for folder in ("samples", "checkpoints") for a in client.list_artifacts(run_id, folder)}
    assert {f"samples/epoch_{e:03d}.txt" for e in range(1, epochs + 1)} | {"checkpoints/last.pt"} <= names
    # what is spooled at the start and the end of a run arrives once too: datasets, system metrics, model
    run = client.get_run(run_id)
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["the_verdict", "the_verdict"]
    readings = steps(client, run_id, "system/cpu_utilization_percentage")
    assert readings == list(range(len(readings))) and readings, f"system metrics of run {run_id}"
    assert len(steps(client, run_id, "best_val_loss")) == 1
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.status for m in models] == ["READY"], f"logged models of run {run_id}"


@needs_tokenizer
def test_every_point_arrives_once_across_a_server_outage(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    args = [*FAST, "--epochs", "3", "--tracking-uri", mlflow_server.url]
    gives_up = Training([*args, "--run-name", "gives-up"], cwd=tmp_path, GPT_TRACKING_TIMEOUT="1")
    waits = Training([*args, "--run-name", "waits"], cwd=tmp_path, GPT_TRACKING_TIMEOUT="300")
    gives_up.wait_for("epoch 1/3")
    waits.wait_for("epoch 1/3")

    mlflow_server.stop()
    code, output = gives_up.finish()  # trains epochs 2 and 3 with no server, waits 1 s, and says how to replay

    assert code == 4, output
    assert "status: FINISHED" in output
    spool = re.search(r"--replay (\S+)$", output, re.MULTILINE).group(1)

    mlflow_server.start()
    code, waited = waits.finish(timeout=300)  # delivers everything once the server is back
    assert code == 0, waited

    result = CliRunner().invoke(train.main, ["--replay", spool])
    assert result.exit_code == 0 and "the run is now FINISHED" in result.output, result.output
    client = MlflowClient(mlflow_server.url)
    assert_every_point_once(client, run_id_of(output), 3)
    assert_every_point_once(client, run_id_of(waited), 3)


@needs_tokenizer
def test_three_trainings_share_a_new_sqlite_store_without_losing_a_point(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trainings = [
        Training([*FAST, "--epochs", "2", "--tracking-uri", uri, "--run-name", f"writer-{i}"], cwd=tmp_path)
        for i in range(3)
    ]
    results = [training.finish(timeout=300) for training in trainings]

    client = MlflowClient(uri)
    for code, output in results:
        assert code == 0, output
        assert "locked" not in output, output
        assert_every_point_once(client, run_id_of(output), 2)
