"""A tracking store's path, checked once for every script (gpt.store.check_tracking_uri).

A SQLite path that cannot be a store (a folder, device, pipe, a file that is not SQLite, memory, a folder
that takes no files) is bad input in train.py, generate.py and every ablate.py subcommand: one line, exit 2,
before anything is read or created. Commands that only read a store neither create nor change one: an empty
file there is no store, as a missing one is. train.py's and generate.py's cases are in test_bad_input.py.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import RANKS, TINY_GRID, VERDICT, assert_options_exist, free_port, load_script

import ablate
import train
from gpt.errors import UserError
from gpt.store import check_tracking_uri, require_store

pytestmark = pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}")

generate = load_script("generate")
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
GRID = [*TINY_GRID, "--data", str(VERDICT), "--set", "train.epochs=1"]
DEAD_SERVER = f"http://127.0.0.1:{free_port()}"  # nothing listens there

# (name, tracking URI, words of the error); {F} is the folder of fixtures
BAD = [
    ("a folder", "sqlite:///{F}/adir", "{F}/adir is a folder; give a database file in it, e.g. sqlite:///{F}/adir/mlflow.db"),
    ("a pipe", "sqlite:///{F}/fifo", "{F}/fifo is not a regular file (a device, pipe or socket); give a database file"),
    ("/dev/null", "sqlite:////dev/null", "/dev/null is not a regular file (a device, pipe or socket)"),
    ("not SQLite", "sqlite:///{F}/notes.txt", "{F}/notes.txt is not a SQLite database"),
    ("in memory", "sqlite:///:memory:", "is an in-memory SQLite database, gone when the process ends"),
    ("no path", "sqlite:///", "runs need a store on disk"),
    ("a loop of links", "sqlite:///{F}/loop1", "{F}/loop1 cannot be followed"),
]  # fmt: skip
# only a writer creates the store: for a reader these are merely missing
UNCREATABLE = [
    ("in /proc", "sqlite:////proc/x/mlflow.db", "cannot create /proc/x/mlflow.db: /proc takes no new files"),
    ("under a file", "sqlite:///{F}/notes.txt/db", "cannot create {F}/notes.txt/db: {F}/notes.txt is not a folder"),
]


@pytest.fixture
def fixtures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """F: a folder, a pipe, an empty file, a text file and a SQLite file; the working folder is empty."""
    folder = tmp_path / "F"
    folder.mkdir()
    (folder / "adir").mkdir()
    os.mkfifo(folder / "fifo")
    (folder / "loop1").symlink_to(folder / "loop2")
    (folder / "loop2").symlink_to(folder / "loop1")
    (folder / "empty.db").touch()
    (folder / "notes.txt").write_text("not a database\n")
    with sqlite3.connect(folder / "other.db") as db:
        db.execute("create table t (x)")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def contents(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its size: a file created, or an empty store filled, shows."""
    return {str(p.relative_to(folder)): p.lstat().st_size for p in sorted(folder.rglob("*"))}


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"exit code {result.exit_code}; output:\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{result.output}"
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("write", [True, False], ids=["writer", "reader"])
@pytest.mark.parametrize(("uri", "words"), [pytest.param(u, w, id=n) for n, u, w in BAD])
def test_a_path_that_cannot_be_a_store_is_refused_and_nothing_is_created(fixtures, uri, words, write) -> None:
    before = contents(fixtures)
    with pytest.raises(UserError) as refused:
        check_tracking_uri(uri.format(F=fixtures), write=write)
    assert words.format(F=fixtures) in str(refused.value)
    assert contents(fixtures) == before, "the check left a file (a lock, a probe) or changed one"


@pytest.mark.parametrize(("uri", "words"), [pytest.param(u, w, id=n) for n, u, w in UNCREATABLE])
def test_a_store_that_cannot_be_created_is_refused_to_a_writer_and_missing_to_a_reader(fixtures, uri, words) -> None:
    uri = uri.format(F=fixtures)
    with pytest.raises(UserError) as refused:
        check_tracking_uri(uri)
    assert words.format(F=fixtures) in str(refused.value)
    assert check_tracking_uri(uri, write=False) is False
    with pytest.raises(UserError, match=r"^no MLflow store at /\S+: train first$"):
        require_store(uri, ": train first")


def test_missing_and_empty_files_hold_no_store_yet_and_a_sqlite_file_does(fixtures) -> None:
    before = contents(fixtures)
    for write in (True, False):
        assert check_tracking_uri(f"sqlite:///{fixtures}/new/sub/mlflow.db", write=write) is False
        assert check_tracking_uri(f"sqlite:///{fixtures}/empty.db", write=write) is False  # a writer may fill it
        assert check_tracking_uri(f"sqlite:///{fixtures}/other.db", write=write) is True
    with pytest.raises(UserError, match=rf"^no MLflow store at {fixtures}/empty.db \(an empty file\); go$"):
        require_store(f"sqlite:///{fixtures}/empty.db", "; go")
    assert contents(fixtures) == before
    assert not (fixtures / "new").exists()


def ablate_args(command: str, uri: str) -> list[str]:
    if command == "compare":
        return ["compare", UNKNOWN_RUN, "--tracking-uri", uri]
    script = ["-o", "grid.sbatch"] if command == "slurm" else []
    return [command, *GRID, "--tracking-uri", uri, *script]


@pytest.mark.parametrize("command", ["plan", "run", "compare", "slurm"])
@pytest.mark.parametrize(("uri", "words"), [pytest.param(u, w, id=n) for n, u, w in BAD])
def test_every_ablate_subcommand_refuses_a_bad_store_path(fixtures, command, uri, words) -> None:
    before = contents(fixtures)
    args = ablate_args(command, uri.format(F=fixtures))
    line = one_error_line(CliRunner().invoke(ablate.main, args))
    assert words.format(F=fixtures) in line
    assert_options_exist(line, ablate.main.commands[command], args)
    assert contents(fixtures) == before and list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize("command", ["run", "slurm"])
def test_ablate_writers_refuse_a_store_they_cannot_create(fixtures, command) -> None:
    line = one_error_line(CliRunner().invoke(ablate.main, ablate_args(command, "sqlite:////proc/x/mlflow.db")))
    assert "cannot create /proc/x/mlflow.db: /proc takes no new files" in line
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize("command", ["plan", "run", "compare"])
def test_a_dead_server_is_bad_input_in_ablate_too(fixtures, command) -> None:
    line = one_error_line(CliRunner().invoke(ablate.main, ablate_args(command, DEAD_SERVER)))
    assert f"tracking server {DEAD_SERVER} is not reachable" in line
    assert list(Path.cwd().iterdir()) == []


def test_readers_leave_an_empty_store_file_empty(fixtures, monkeypatch) -> None:
    uri = f"sqlite:///{fixtures}/empty.db"
    before = contents(fixtures)
    sample = ["--run", UNKNOWN_RUN, "--prompt", "Hi", "--tracking-uri", uri]
    line = one_error_line(CliRunner().invoke(generate.main, sample))
    assert f"no MLflow store at {fixtures}/empty.db (an empty file): train a model first" in line
    line = one_error_line(CliRunner().invoke(ablate.main, ["compare", UNKNOWN_RUN, "--tracking-uri", uri]))
    assert f"no MLflow store at {fixtures}/empty.db (an empty file); pass the --tracking-uri" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same through the environment
    planned = CliRunner().invoke(ablate.main, ["plan", *GRID])
    assert planned.exit_code == 0, planned.output
    assert "no measurement" in planned.output, planned.output
    assert contents(fixtures) == before, "a reader created or filled the store (or left a lock file)"
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize("memory", ["sqlite:///:memory:", "sqlite:///", "sqlite://"])
def test_an_in_memory_store_from_the_environment_is_refused_by_every_script(fixtures, monkeypatch, memory) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", memory)
    runs = [
        (train.main, ["--config", TINY_GRID[1], "--data", str(VERDICT), "--epochs", "1", "--no-log-model"]),
        (train.main, ["--config", TINY_GRID[1], "--data", str(VERDICT), "--dry-run"]),
        (generate.main, ["--run", UNKNOWN_RUN, "--prompt", "Hi"]),
        (ablate.main, ["run", *GRID]),
        (ablate.main, ["plan", *GRID]),
        (ablate.main, ["compare", UNKNOWN_RUN]),
        (ablate.main, ["slurm", *GRID, "-o", "grid.sbatch"]),
    ]
    for command, args in runs:
        line = one_error_line(CliRunner().invoke(command, args))
        assert f"tracking store {memory!r} is an in-memory SQLite database" in line, args
        assert "runs need a store on disk; give sqlite:///PATH" in line
    assert list(Path.cwd().iterdir()) == [], "no ./mlruns, spool or script for a store that would vanish"
