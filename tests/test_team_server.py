"""A team server with MLflow's basic-auth app (docs/team-server.md): good credentials train, log and
register a model; a wrong password is a one-line error before any training, with nothing spooled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RANKS, TINY_TRAIN, MlflowServer, last_run_id, run_train
from mlflow.tracking import MlflowClient

pytestmark = [
    pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}"),
    pytest.mark.usefixtures("one_thread"),
]
TINY = [*TINY_TRAIN, "--set", "train.batch_size=32", "--set", "train.sample_every=0", "--epochs", "1"]
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (requirements-dev.txt)")
    server = MlflowServer(tmp_path_factory.mktemp("auth-server"), app_name="basic-auth")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def signed_in_as(monkeypatch: pytest.MonkeyPatch):
    """Set MLflow's credential variables for the test (the client and our checks both read them)."""

    def sign_in(user: str, password: str) -> None:
        monkeypatch.setenv(CREDENTIALS[0], user)
        monkeypatch.setenv(CREDENTIALS[1], password)

    return sign_in


def test_a_wrong_password_stops_before_training_with_nothing_spooled(server, signed_in_as, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    signed_in_as(server.ADMIN, "not-the-password")
    code, output = run_train([*TINY, "--tracking-uri", server.url, "--cache-dir", str(cache)])
    assert code == 2, output
    assert output.splitlines() == [
        f"error: tracking server {server.url} refused user 'admin' and its password (HTTP 401); set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server"
    ]
    assert not cache.exists()  # no data read, no run folder, no spool
    signed_in_as(server.ADMIN, server.ADMIN_PASSWORD)
    client = MlflowClient(server.url)
    assert [e.name for e in client.search_experiments()] == ["Default"]  # no experiment, hence no run


def test_a_user_the_admin_created_trains_and_registers_a_model(server, signed_in_as, tmp_path: Path) -> None:
    from mlflow.server import get_app_client

    signed_in_as(server.ADMIN, server.ADMIN_PASSWORD)
    get_app_client("basic-auth", tracking_uri=server.url).create_user("alice", "her-password")  # as the docs show
    signed_in_as("alice", "her-password")
    args = [*TINY, "--tracking-uri", server.url, "--cache-dir", str(tmp_path), "--register-model", "alice-tiny"]
    code, output = run_train(args)
    assert code == 0, output
    run_id = last_run_id(output)
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"the_verdict"}
    assert "system/cpu_utilization_percentage" in run.data.metrics
    version = client.get_model_version("alice-tiny", "1")
    assert version.run_id == run_id and version.status == "READY"
    signed_in_as("alice", "wrong")
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(server.url).get_run(run_id)  # the server does check every request
