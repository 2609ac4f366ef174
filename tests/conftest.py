"""Shared test set-up: offline tokenizer, a private cache, no MLflow telemetry; a real MLflow server."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # public-domain texts and GPT-2's ranks beside the clone, where CI has them
CORPUS = SHARED / "corpus"
ALICE = CORPUS / "alice_in_wonderland.txt"  # the tests that read this very book skip without it
GENERATED = Path(tempfile.gettempdir()) / "gpt-mlflow-tests"
needs_alice = pytest.mark.skipif(not ALICE.is_file(), reason=f"no {ALICE} (the shared public-domain corpus)")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _atomic_write(path: Path, content: str) -> Path:
    """Write a file other test processes may be writing at the same moment, with the same content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_text(content, encoding="utf-8")
    os.replace(partial, path)
    return path


def story(n_chars: int = 24_000, seed: int = 0) -> str:
    """A plain English text of about n_chars characters, the same every time: sentences drawn from a small
    self-written grammar, so a tiny model has something to learn. The tests' own text, in place of the
    shared corpus."""
    rng = random.Random(seed)
    who = ["the old keeper", "a young sailor", "the miller's daughter", "my brother", "the tall stranger",
           "a grey cat", "the doctor", "our neighbour", "the little boy", "the captain"]
    did = ["walked slowly to", "looked out over", "wrote a letter about", "dreamed once more of", "ran back to",
           "sang quietly beside", "painted a picture of", "forgot everything about", "waited all night by"]
    what = ["the lighthouse", "the harbour", "the narrow bridge", "the garden wall", "the empty church",
            "the river", "the market square", "the mill", "the cold sea", "the station"]
    when = ["in the morning", "before the storm", "after supper", "on a Sunday", "at the end of summer",
            "when the bells rang", "while it rained", "as the sun went down"]
    said = ['"It is late," said {w}.', '"Come and see," {w} whispered.', '"I remember it well," said {w}.',
            '"Nobody knew," {w} answered, "and nobody asked."']  # fmt: skip
    sentences = []
    while sum(len(x) + 1 for x in sentences) < n_chars:
        if rng.random() < 0.2:
            sentences.append(rng.choice(said).format(w=rng.choice(who)))
        else:
            sentence = f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}."
            sentences.append(sentence[0].upper() + sentence[1:])
        if rng.random() < 0.1:
            sentences.append("\n\n")
    return " ".join(sentences).replace(" \n\n ", "\n\n")


def _ranks_file() -> Path:
    """GPT-2's ranks: $GPT_TIKTOKEN_FILE, else the shared copy, else tiktoken's own download written out
    as a ranks file (the tests point every process at one file). May not exist: tests then skip."""
    given = os.environ.get("GPT_TIKTOKEN_FILE", "").strip()
    if given:
        return Path(given).expanduser()
    shared = SHARED / "tokenizer" / "gpt2.tiktoken"
    written = GENERATED / "gpt2.tiktoken"
    if shared.is_file() or written.is_file():
        return shared if shared.is_file() else written
    try:
        import tiktoken

        ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks  # downloads once, into tiktoken's cache
    except Exception:  # offline: the tests that need a tokenizer skip, naming the file
        return shared
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1]))
    return _atomic_write(written, "\n".join(lines) + "\n")


RANKS = _ranks_file()
if RANKS.is_file():
    os.environ.setdefault("GPT_TIKTOKEN_FILE", str(RANKS))
# a short public-domain story (20 KB, 5,145 tokens) when the shared corpus is there, else a story of ~5,100 tokens
VERDICT = CORPUS / "the_verdict.txt"
if not VERDICT.is_file():
    VERDICT = _atomic_write(GENERATED / "story.txt", story())


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


def load_script(name: str) -> types.ModuleType:
    """A script of the repository (generate.py...) as a module, under its own name plus _script."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_options_exist(message: str, command: click.Command, given: list[str]) -> None:
    """Every --option a message names is an option of the command that printed it (the user's own aside)."""
    options = {name for param in command.params for name in [*param.opts, *param.secondary_opts]}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message)) - {"--help", *given}
    assert mentioned <= options, f"{command.name} has no option {', '.join(sorted(mentioned - options))}: {message}"


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
        **({"GPT_TIKTOKEN_FILE": str(RANKS)} if RANKS.is_file() else {}),
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
