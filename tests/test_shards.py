"""Grids beyond one process: shards, duplicate workers and Slurm tasks sharing one real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, TINY_GRID, VERDICT, MlflowServer, subprocess_env
from mlflow.entities import Run, RunData, RunInfo, RunTag, ViewType
from mlflow.tracking import MlflowClient

import ablate
from gpt.ablation import runner
from gpt.ablation.claims import CLAIM_START_S, CLAIM_TAG, judge, take_claim
from gpt.ablation.grid import Cell
from gpt.ablation.grid_file import load_grid
from gpt.ablation.workers import gpu_slots
from gpt.config import Config
from gpt.errors import UserError

TINY = [
    *TINY_GRID,
    "--seeds", "0",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the whole file: each test uses its own experiment."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred tokens: a cell trains in a step or two, so the tests time the coordination, not training."""
    path = tmp_path_factory.mktemp("data") / "verdict_head.txt"
    path.write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def start_ablate(args: list[str], url: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "ablate.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=subprocess_env(MLFLOW_TRACKING_URI=url),
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not end within {timeout} s:\n{output}")
    return process.returncode, output


def grid_runs(url: str, experiment: str) -> tuple[list[Run], list[Run]]:
    """(active parents, active children) of the experiment."""
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], "", run_view_type=ViewType.ACTIVE_ONLY)
    parents = [r for r in runs if r.data.tags.get("ablation.role") == "parent"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def artifact_names(url: str, run_id: str) -> set[str]:
    return {a.path for a in MlflowClient(url).list_artifacts(run_id)}


def test_two_shards_and_a_duplicate_train_every_cell_exactly_once(
    server: MlflowServer, text: Path, tmp_path: Path
) -> None:
    grid = [*TINY, "--data", str(text), "--vary", "model.n_layers=1,2", "--vary", "data.stride=0.5x,1x"]
    grid += ["--name", "sharded", "--experiment", "sharded"]
    shards = ["0/2", "1/2", "0/2"]  # shard 0 twice: its two processes race for the same cells
    processes = [start_ablate(["run", *grid, "--shard", shard], server.url, tmp_path) for shard in shards]
    results = [finish(p) for p in processes]
    for shard, (code, output) in zip(shards, results, strict=True):
        assert code == 0, f"shard {shard}:\n{output}"
    parents, children = grid_runs(server.url, "sharded")
    assert len(parents) == 1, f"shards started together must agree on one parent run, got {len(parents)}"
    cells = [r.data.tags["ablation.cell_id"] for r in children]
    assert len(cells) == 4 and len(set(cells)) == 4, f"one run per cell expected, got cells {cells}"
    assert all(r.info.status == "FINISHED" for r in children)
    trained = sum(output.count(": FINISHED") for _, output in results)
    assert trained == 4, "each cell is trained by exactly one process"
    duplicate = results[0][1] + results[2][1]
    assert duplicate.count(": SKIPPED") == 2, (
        f"the duplicate shard 0 processes each leave the other's cells:\n{duplicate}"
    )
    claims = sorted(k for k in parents[0].data.params if k.startswith("claim."))
    assert claims == sorted(f"claim.{cell}.0" for cell in cells), "one claim per cell, taken once"
    assert parents[0].info.status == "FINISHED"
    assert {"report.md", "summary.csv"} <= artifact_names(server.url, parents[0].info.run_id)
    result = CliRunner().invoke(ablate.main, ["compare", parents[0].info.run_id, "--tracking-uri", server.url,
                                              "--out-dir", str(tmp_path / "report")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.output and (tmp_path / "report" / "report.md").is_file()


def test_slurm_tasks_finishing_apart_leave_the_report_to_the_last(
    server: MlflowServer, text: Path, tmp_path: Path
) -> None:
    script = tmp_path / "grid.sbatch"
    args = ["slurm", *TINY, "--data", str(text), "--vary", "model.n_layers=1,2", "--name", "apart"]
    args += ["--tracking-uri", server.url, "--log-dir", str(tmp_path / "logs"), "-o", str(script)]
    result = CliRunner().invoke(ablate.main, args)
    assert result.exit_code == 0, result.output

    def task(index: int) -> str:
        process = subprocess.Popen(
            ["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            env=subprocess_env(SLURM_ARRAY_TASK_ID=str(index), MLFLOW_TRACKING_URI="http://wrong.invalid"),
        )  # fmt: skip
        code, output = finish(process)
        assert code == 0, f"task {index}:\n{output}"
        return output

    first = task(0)
    assert "1 of 2 cells are still running or not started" in first, first
    (parent,), children = grid_runs(server.url, "apart")
    assert parent.info.status == "RUNNING", "a task that ends early must not end the grid's parent run"
    assert len(children) == 1 and "report.md" not in artifact_names(server.url, parent.info.run_id)

    last = task(1)
    assert "verdict:" in last and "parent run FINISHED" in last, last
    (parent,), children = grid_runs(server.url, "apart")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {r.data.tags["factor.model.n_layers"] for r in children} == {"1", "2"}, "task k trains cell k"
    assert "report.md" in artifact_names(server.url, parent.info.run_id)


def test_racing_shards_share_one_parent_and_one_claim_per_cell(server: MlflowServer, tmp_path: Path) -> None:
    spec = load_grid(None, name="race", vary=["model.n_layers=1,2"])
    options = runner.RunnerOptions(experiment="race", tracking_uri=server.url, cache_dir=tmp_path)
    cell = Cell(Config(), {"model.n_layers": "1"}, 0, "0123456789ab", "L1-seed0")
    barrier, parents, claims = threading.Barrier(6), [], []

    def shard(number: int) -> None:
        barrier.wait()
        parent_id = runner.open_parent(spec, [cell], [], options)
        parents.append(parent_id)
        client = MlflowClient(server.url)
        experiment_id = client.get_run(parent_id).info.experiment_id
        barrier.wait()  # every shard has settled on its parent: now all claim the one cell at once
        token = f"{socket.gethostname()} {os.getpid()} {time.time():.3f} worker{number}"
        reason = take_claim(client, experiment_id, parent_id, cell, token, options.started)
        claims.append((token, reason))

    threads = [threading.Thread(target=shard, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(set(parents)) == 1 and len(parents) == 6, f"shards chose parents {parents}"
    winners = [token for token, reason in claims if reason is None]
    assert len(winners) == 1, f"exactly one shard may win the cell: {claims}"
    params = MlflowClient(server.url).get_run(parents[0]).data.params
    assert params.get("claim.0123456789ab.0") == winners[0] and "claim.0123456789ab.1" not in params
    assert all("starting" in reason for _, reason in claims if reason), "the losers see the winner's live claim"


def test_slurm_script_passes_the_grid_and_asks_for_one_gpu_per_task(tmp_path: Path) -> None:
    script = tmp_path / "arch.sbatch"
    grid = [*TINY, "--data", str(VERDICT), "--vary", "model.n_layers=1,2", "--vary", "data.stride=0.5x,1x"]
    args = ["slurm", *grid, "--name", "arch", "--tracking-uri", "http://mlflow.team:5000", "--partition", "gpu"]
    args += ["--time", "2:00:00", "--sbatch", "--constraint=a100", "--log-dir", str(tmp_path / "logs")]
    args += ["--no-log-model", "--register-model", "arch-best"]
    result = CliRunner().invoke(ablate.main, [*args, "-o", str(script)])
    assert result.exit_code == 0, result.output
    text = script.read_text()
    for line in ["#SBATCH --array=0-3", "#SBATCH --gres=gpu:1", "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --constraint=a100", f"#SBATCH --output={tmp_path}/logs/%x-%A_%a.out",
                 "export MLFLOW_TRACKING_URI=http://mlflow.team:5000"]:  # fmt: skip
        assert line in text.splitlines(), f"{line!r} missing from:\n{text}"
    command = text.splitlines()[-1]
    assert command.endswith('--shard "${SLURM_ARRAY_TASK_ID}/4"'), command
    for option in ["--vary model.n_layers=1,2", "--vary data.stride=0.5x,1x", "--seeds 0", "--set train.epochs=1",
                   "--experiment arch", f"--data {VERDICT}", "--name arch", "--no-log-model",
                   "--register-model arch-best"]:  # fmt: skip
        assert option in command, f"{option!r} missing from {command}"
    assert (tmp_path / "logs").is_dir(), "Slurm does not create the log folder: the script's writer must"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--tasks", "9"], "--tasks 9"), (["--time", "two hours"], "--time"), (["--partition", " "], "--partition"),
     (["--register-model", "my gpt"], "registered model name 'my gpt' is not allowed")],
)
def test_bad_slurm_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    grid = [*TINY, "--data", str(VERDICT), "--vary", "model.n_layers=1,2"]
    result = CliRunner().invoke(ablate.main, ["slurm", *grid, *args, "-o", str(tmp_path / "x.sbatch")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_packing_cells_needs_the_gpus_named(tmp_path: Path) -> None:
    grid = [*TINY, "--data", str(VERDICT), "--vary", "model.n_layers=1,2"]
    result = CliRunner().invoke(
        ablate.main, ["run", *grid, "--per-gpu", "4", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--gpus" in lines[0], result.output
    assert not (tmp_path / "m.db").exists(), "a bad option creates no store"


def fake_run(status: str, token: str = "", host: str = "", pid: int = 0, start: int = 1000) -> Run:
    tags = {CLAIM_TAG: token, "ablation.host": host, "ablation.pid": str(pid)}
    info = RunInfo(f"run{start}", "1", "", status, start, None, "active")
    return Run(info, RunData(tags=[RunTag(k, v) for k, v in tags.items()]))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_cell_state_follows_its_latest_claim() -> None:
    here, me = socket.gethostname(), os.getpid()
    mine, dead = f"{here} {me} 100.0 a", f"{here} {dead_pid()} 100.0 b"
    cases = [
        ({}, [], "UNTRIED"),
        ({0: mine}, [], "RUNNING"),  # claimed, its run not created yet
        ({0: dead}, [], "FAILED"),  # ... and its process is gone
        ({0: "elsewhere 1 100.0 c"}, [], "RUNNING"),  # another machine's process is assumed alive
        ({0: "elsewhere 1 100.0 c"}, [], "FAILED", 100.0 + CLAIM_START_S + 1),  # ... unless its run never came
        ({0: mine}, [fake_run("RUNNING", mine, here, me)], "RUNNING"),
        ({0: dead}, [fake_run("RUNNING", dead, here, dead_pid())], "FAILED"),
        ({0: mine}, [fake_run("KILLED", mine, here, me)], "FAILED"),
        ({0: mine, 1: dead}, [fake_run("FINISHED", mine, here, me)], "DONE"),
    ]
    for claims, runs, status, *later in cases:
        state = judge(claims, runs, now=later[0] if later else 200.0)
        assert state.status == status, f"claims {claims}, runs {[r.info.status for r in runs]}: {state}"
        assert state.next_attempt == len(claims)


def test_gpu_ids_count_within_the_visible_gpus() -> None:
    assert gpu_slots([0, 1], 2) == ["0", "0", "1", "1"]
    assert gpu_slots([0, 1], 1, "3,5") == ["3", "5"], "under Slurm, --gpus 0 is the job's first GPU"
    with pytest.raises(UserError, match="only 2 GPU"):
        gpu_slots([2], 1, "3,5")


def slurm_world(folder: Path) -> tuple[list[str], dict[str, Path]]:
    """A grid file with its own base config and data file, and the slurm arguments that use them."""
    files = {"grid": folder / "grid.yaml", "base": folder / "base.yaml", "data": folder / "book.txt"}
    files["base"].write_text((ROOT / "configs" / "tiny.yaml").read_text())
    files["data"].write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    files["grid"].write_text(
        f"base: base.yaml\ndata: [{files['data']}]\nvary: {{model.n_layers: [1, 2]}}\nseeds: [0]\n"
        "config: {model.context_length: 16, model.emb_dim: 16}\n"
    )
    os.mkfifo(folder / "fifo")
    (folder / "broken").symlink_to(folder / "nowhere" / "x")
    (folder / "file.txt").write_text("a file")
    args = ["slurm", str(files["grid"]), "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--gpus-per-task", "0"]
    return args, files


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("/dev/null", "-o/--output /dev/null is a device, pipe or socket; give a regular file or a new file's path"),
        ("{in}/fifo", "-o/--output {in}/fifo is a device, pipe or socket"),
        ("{in}/broken", "-o/--output {in}/broken is a broken symbolic link"),
        ("{in}/file.txt/x.sbatch", "cannot create the folder {in}/file.txt set by -o/--output: it is a file"),
        ("/proc/x.sbatch", "cannot create the file /proc/x.sbatch set by -o/--output: the file system there takes no"),
        ("{in}/grid.yaml", "-o/--output {in}/grid.yaml is the grid file ({in}/grid.yaml); the script would overwrite"),
        ("{in}/base.yaml", "-o/--output {in}/base.yaml is the base config ({in}/base.yaml)"),
        ("{in}/book.txt", "-o/--output {in}/book.txt is a data file of the grid ({in}/book.txt)"),
        ("{in}/mlflow.db", "-o/--output {in}/mlflow.db is the MLflow store ({in}/mlflow.db)"),
    ],
)
def test_a_script_file_that_cannot_be_written_or_is_an_input_is_refused(
    tmp_path: Path, monkeypatch, output: str, message: str
) -> None:
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    args, _ = slurm_world(inputs)
    before = contents(inputs)
    result = CliRunner().invoke(ablate.main, [*args, "-o", output.format(**{"in": inputs})])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: " + message.format(**{"in": inputs})), result.output
    assert contents(inputs) == before, "an input was changed"
    assert list(work.iterdir()) == [], "no log folder and no script for bad input"


def test_a_script_file_goes_in_a_folder_made_for_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args, _ = slurm_world(tmp_path)
    result = CliRunner().invoke(ablate.main, [*args, "-o", "scripts/new/x.sbatch"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scripts" / "new" / "x.sbatch").read_text().startswith("#!/bin/bash\n")
    assert (tmp_path / "slurm-logs").is_dir()


@pytest.mark.parametrize(
    ("log_dir", "reason"),
    [
        ("/dev/null", "/dev/null: it is a device, pipe or socket"),
        ("fifo", "fifo: it is a device, pipe or socket"),
        ("broken", "broken: it is a broken symbolic link (to nothing, or a loop of links)"),
        ("/proc/logs", "/proc/logs: the file system there takes no new folders"),
        ("file.txt/sub", "file.txt/sub: file.txt is a file"),
    ],
)
def test_a_bad_log_dir_is_refused_and_no_script_written(tmp_path: Path, monkeypatch, log_dir: str, reason: str):
    monkeypatch.chdir(tmp_path)
    args, _ = slurm_world(tmp_path)
    before = contents(tmp_path)
    result = CliRunner().invoke(ablate.main, [*args, "-o", "x.sbatch", "--log-dir", log_dir])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    expected = f"error: Invalid value for '--log-dir': cannot create the folder {reason}; give a folder that exists"
    assert lines[0].startswith(expected), result.output
    assert contents(tmp_path) == before and not (tmp_path / "x.sbatch").exists()


def sbatch_arguments(line: str) -> list[str]:
    """An #SBATCH line's arguments as sbatch splits them (src/sbatch/opt.c, _get_argument): whitespace
    separates, ' and " group, a backslash escapes the next character, an unquoted # ends the line."""
    arguments, current, quote, escape, started = [], [], "", False, False
    for char in line.removeprefix("#SBATCH"):
        if escape:
            escape = False
        elif char == "\\":
            escape = started = True
            continue
        elif quote:
            if char == quote:
                quote = ""
                continue
        elif char in "\"'":
            quote, started = char, True
            continue
        elif char == "#":
            break
        elif char.isspace():
            if started:
                arguments.append("".join(current))
            current, started = [], False
            continue
        current.append(char)
        started = True
    assert not quote, f"unmatched quote in {line!r}"
    return arguments + (["".join(current)] if started else [])


def test_script_paths_reach_sbatch_whole_and_python_expands_tilde(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "my runs #1 \"x\" 'y' a\\b"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args, _ = slurm_world(tmp_path)
    log_dir = "logs 50% done"
    result = CliRunner().invoke(ablate.main, [*args, "-o", "x.sbatch", "--log-dir", log_dir, "--python", "~/bin/py"])
    assert result.exit_code == 0, result.output
    lines = (work / "x.sbatch").read_text().splitlines()
    assert sbatch_arguments(next(x for x in lines if x.startswith("#SBATCH --chdir="))) == [f"--chdir={work}"]
    output = next(x for x in lines if x.startswith("#SBATCH --output="))
    assert sbatch_arguments(output) == ["--output=logs 50%% done/%x-%A_%a.out"], "% of the folder is written %%"
    assert lines[-1].startswith(f"exec {tmp_path}/home/bin/py "), lines[-1]
    assert (work / log_dir).is_dir()


def test_a_log_dir_with_a_backslash_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args, _ = slurm_world(tmp_path)
    result = CliRunner().invoke(ablate.main, [*args, "-o", "x.sbatch", "--log-dir", "logs\\a"])
    assert result.exit_code == 2 and "--log-dir 'logs\\\\a': Slurm reads a backslash" in result.output, result.output
    assert not (tmp_path / "x.sbatch").exists()
