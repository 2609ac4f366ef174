"""Paths: `~` and relative paths read the same way in every path the three scripts accept, every message
about a store names its absolute path, and a store moved with `mv` is read where it is now, while what
would write to its old place is refused with a one-line fix; nothing is ever created elsewhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import RANKS, ROOT, TINY_TRAIN, VERDICT, last_run_id, load_script, run_train
from mlflow.tracking import MlflowClient

import ablate

pytestmark = [
    pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}"),
    pytest.mark.usefixtures("one_thread"),
]
generate_script = load_script("generate")

UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
ONE_EPOCH = [*TINY_TRAIN, "--epochs", "1", "--set", "train.sample_every=0"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of its own, and an empty working folder beside it (the current directory)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(work)
    return home


def generate(*args: str, prompt: str | None = "The") -> Result:
    """generate.py in this process, with --prompt unless prompt is None."""
    given = ["--max-tokens", "3", "--seed", "1", *args, *(["--prompt", prompt] if prompt is not None else [])]
    return CliRunner().invoke(generate_script.main, given)


def error_line(code: int, output: str) -> str:
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}:\n{output}"
    return lines[0]


# ---------------------------------------------------------------- ~ and relative paths


def test_a_tilde_store_is_one_store_under_home_that_every_later_command_finds(home: Path, monkeypatch) -> None:
    uri = "sqlite:///~/store/mlflow.db"
    code, output = run_train([*ONE_EPOCH, "--tracking-uri", uri])
    assert code == 0, output
    run_id = last_run_id(output)
    assert (home / "store" / "mlflow.db").is_file()
    assert list(Path.cwd().iterdir()) == [], "no folder named ~ (or anything else) in the working directory"
    run = MlflowClient(f"sqlite:///{home}/store/mlflow.db").get_run(run_id)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(home / "store"), "artifacts beside it"

    result = generate("--run", run_id, "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert generate("--run", run_id).exit_code == 0, "the same store through $MLFLOW_TRACKING_URI"
    code, output = run_train(["--resume", run_id, "--epochs", "2"])
    assert code == 0, output
    assert MlflowClient(f"sqlite:///{home}/store/mlflow.db").get_run(run_id).info.status == "FINISHED"
    assert list(Path.cwd().iterdir()) == []


def test_a_relative_store_is_the_working_directorys_and_messages_name_it_absolute(home: Path, tmp_path) -> None:
    code, output = run_train([*ONE_EPOCH, "--tracking-uri", "sqlite:///rel/mlflow.db"])
    assert code == 0, output
    run_id = last_run_id(output)
    store = tmp_path / "work" / "rel" / "mlflow.db"
    assert store.is_file()
    os.chdir(home)
    assert generate("--run", run_id, "--tracking-uri", "sqlite:///../work/rel/mlflow.db").exit_code == 0
    line = error_line(*_result(generate("--run", UNKNOWN_RUN, "--tracking-uri", "sqlite:///../work/rel/mlflow.db")))
    assert f"unknown run id '{UNKNOWN_RUN}' in sqlite:///{store}" in line
    # the default store is the working directory's: from elsewhere, the message says where it looked and why
    line = error_line(*_result(generate("--run", run_id)))
    assert f"no MLflow store at {home}/mlruns/mlflow.db (the default store, mlruns/ in the working directory" in line
    code, output = run_train(["--resume", run_id, "--epochs", "2"])
    assert f"no MLflow store at {home}/mlruns/mlflow.db (the default store" in error_line(code, output)
    assert list(home.iterdir()) == [], "looking for a run creates no store"


def _result(result: Result) -> tuple[int, str]:
    return result.exit_code, result.output


def test_every_path_option_reads_tilde_as_home(home: Path) -> None:
    shutil.copy(ROOT / "configs" / "tiny.yaml", home / "tiny.yaml")
    shutil.copy(VERDICT, home / "book.txt")
    shutil.copy(RANKS, home / "ranks.tiktoken")
    (home / "grid.yaml").write_text("base: ~/tiny.yaml\ndata: [~/book.txt]\nvary: {model.n_layers: [1, 2]}\n")
    (home / "prompt.txt").write_text("Once upon a time")
    paths = ["--tokenizer-file", "~/ranks.tiktoken", "--cache-dir", "~/cache"]
    small = ONE_EPOCH[4:]  # TINY_TRAIN's settings without its --config and --data
    code, output = run_train(["--config", "~/tiny.yaml", *small, "--data", "~/book.txt", *paths,
                              "--tracking-uri", "sqlite:///~/s.db"])  # fmt: skip
    assert code == 0, output
    assert (home / "s.db").is_file()
    assert list((home / "cache" / "cleaned").iterdir()) == [home / "cache" / "cleaned" / "cleaned_book.txt"]
    (last,) = home.rglob("last.pt")
    shutil.copy(last, home / "model.pt")
    result = generate("--checkpoint", "~/model.pt", "--prompt-file", "~/prompt.txt", *paths, prompt=None)
    assert result.exit_code == 0 and "=== prompt ===\nOnce upon a time\n" in result.stdout, result.output

    result = CliRunner().invoke(ablate.main, ["plan", "~/grid.yaml", *paths])
    assert result.exit_code == 0 and "factors model.n_layers" in result.output, result.output
    line = error_line(*run_train(["--replay", "~/spool"]))
    assert f"--replay {home}/spool: no such folder" in line
    line = error_line(*run_train(["--resume", "~/none.pt"]))
    assert f"{home}/none.pt" in line
    line = error_line(*_result(generate("--checkpoint", "~/none.pt")))
    assert f"{home}/none.pt" in line
    line = error_line(*_result(generate("--checkpoint", "~/model.pt", "--prompt-file", "~/no.txt", prompt=None)))
    assert f"prompt file not found: {home}/no.txt" in line
    assert list(Path.cwd().iterdir()) == [], "no folder named ~ in the working directory"


# ---------------------------------------------------------------- a moved store


def test_a_moved_store_is_read_where_it_is_and_never_written_where_it_was(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    old, new = tmp_path / "old", tmp_path / "new"
    code, output = run_train([*ONE_EPOCH, "--tracking-uri", f"sqlite:///{old}/mlruns/mlflow.db"])
    assert code == 0, output
    run_id = last_run_id(output)
    new.mkdir()
    shutil.move(old / "mlruns", new / "mlruns")
    uri = f"sqlite:///{new}/mlruns/mlflow.db"

    result = generate("--run", run_id, "--tracking-uri", uri, "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    assert f"{new}/mlruns/artifacts/" in result.output, "the checkpoint beside the moved store"
    fix = f"the store moved from {old}/mlruns to {new}/mlruns"
    line = error_line(*run_train(["--resume", run_id, "--epochs", "2", "--tracking-uri", uri]))
    assert fix in line and f"ln -s {new}/mlruns {old}/mlruns" in line and "resuming writes" in line
    line = error_line(*run_train(["--replay", str(new / "mlruns" / "local" / run_id)]))
    assert fix in line and "replaying writes" in line, "the spool finds the store it moved with"
    line = error_line(*_result(generate("--run", run_id, "--tracking-uri", uri, "--log")))
    assert fix in line and "logging writes" in line
    (last,) = (new / "mlruns").rglob("last.pt")
    line = error_line(*run_train(["--resume", str(last), "--epochs", "2"]))
    assert f"names the store {old}/mlruns/mlflow.db, which does not exist (moved?)" in line
    assert f"--tracking-uri sqlite:///{new}/mlruns/mlflow.db" in line
    assert list(old.iterdir()) == [], "nothing may be created at the old place"

    os.symlink(new / "mlruns", old / "mlruns")  # the fix the messages name
    code, output = run_train(["--resume", run_id, "--epochs", "2", "--tracking-uri", uri])
    assert code == 0, output
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "val_loss")] == [1, 2]
