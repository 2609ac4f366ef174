"""Shared test set-up: offline tokenizer, a private cache, no MLflow telemetry; a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
ALICE = CORPUS / "alice_in_wonderland.txt"
VERDICT = CORPUS / "the_verdict.txt"
RANKS = SHARED / "tokenizer" / "gpt2.tiktoken"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if RANKS.is_file():
    os.environ.setdefault("GPT_TIKTOKEN_FILE", str(RANKS))


# A train.py command line that trains in seconds on a CPU: tests add the settings they pin down.
TINY_TRAIN = [
    "--config", str(ROOT / "configs" / "tiny.yaml"),
    "--data", str(VERDICT),
    "--set", "model.context_length=16",
    "--set", "model.emb_dim=16",
    "--set", "train.sample_tokens=3",
    "--set", "train.checkpoint_every_s=0",
]  # fmt: skip


# ablate.py options for grids of tiny cells: tests add their factors, seeds and epochs.
TINY_GRID = [
    "--base", str(ROOT / "configs" / "tiny.yaml"),
    "--set", "model.context_length=16",
    "--set", "model.emb_dim=16",
    "--set", "train.sample_every=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls run fastest on one thread (and match the train.py subprocesses, OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(args: list[str]) -> tuple[int, str]:
    """train.py in this process: (exit code, output)."""
    import train

    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    return result.exit_code, result.output


def last_run_id(output: str) -> str:
    last = output.strip().splitlines()[-1]
    assert last.startswith("run_id: "), f"the last line should be 'run_id: <id>', got {last!r}"
    return last.split(": ", 1)[1]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Token caches and cleaned texts go to a temporary folder, never the user's ~/.cache."""
    os.environ["GPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("gpt-cache"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again (same port, same store).

    app_name="basic-auth" starts MLflow's sign-in app, with the admin account ADMIN (password ADMIN_PASSWORD)
    and its user database in the folder.
    """

    ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-tests"

    def __init__(self, folder: Path, app_name: str | None = None):
        self.folder, self.port, self.app_name = folder, free_port(), app_name
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def _auth_config(self) -> dict[str, str]:
        """MLflow's basic-auth settings: a user database in the folder, not ./basic_auth.db."""
        config = self.folder / "basic_auth.ini"
        config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.folder}/basic_auth.db\nadmin_username = {self.ADMIN}\n"
            f"admin_password = {self.ADMIN_PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        # the sign-in app protects its forms against CSRF with this key (MLflow refuses to start without one)
        return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-secret"}

    def start(self, timeout: float = 120) -> None:
        # the job runner (a dozen huey workers) is not needed and doubles the start-up time
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        app = ["--app-name", self.app_name] if self.app_name else []
        if self.app_name == "basic-auth":
            env.update(self._auth_config())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder}/server.db", "--artifacts-destination",
             str(self.folder / "server-artifacts"), "--workers", "1", *app],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True, cwd=self.folder,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    pytest.fail(f"mlflow server exited with code {self.process.returncode} while starting")
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not start within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server and every process it started (uvicorn runs in a child process)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived the server
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a train.py subprocess: offline tokenizer, the private cache, one thread.

    One thread is fastest for tiny models on a shared 2-core machine; tests that compare losses with
    an in-process run set torch to one thread as well, so both compute the same way.
    """
    return {
        **os.environ,
        "GPT_TIKTOKEN_FILE": str(RANKS),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


class Training:
    """train.py in a subprocess (its own process group), with its output lines collected as they come."""

    def __init__(self, args: list[str], cwd: Path, **env: str):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=subprocess_env(**env),
            start_new_session=True,  # a terminal's Ctrl-C during the tests does not reach it
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 180) -> str:
        """The first (new) output line containing text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            if text in line:
                return line
        self.process.kill()
        pytest.fail(f"train.py printed no line with {text!r}; its output:\n{''.join(self.output)}")

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """Exit code and whole output, once the process has ended."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"train.py did not end within {timeout:.0f} s; its output:\n{''.join(self.output)}")
        self._reader.join(timeout=10)
        return code, "".join(self.output)
