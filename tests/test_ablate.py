"""ablate.py end to end: a 2x2 grid in parallel, resume without new runs, failure isolation, bad grids."""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import TINY_GRID, VERDICT, assert_options_exist
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import ablate
from gpt.ablation import report as report_module

EPOCH_METRICS = ("train_loss", "val_loss", "val_ppl", "tokens_seen", "epoch_seconds", "wall_seconds")
GRID = [
    *TINY_GRID,
    "--data", str(VERDICT),
    "--vary", "model.n_layers=1,2",
    "--vary", "data.stride=0.5x,1x",
    "--seeds", "0",
    "--set", "train.epochs=2",
    "--set", "train.batch_size=32",
]  # fmt: skip


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(ablate.main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def children(uri: str, parent_id: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", run_view_type=ViewType.ACTIVE_ONLY
    )


def parent_id_of(output: str) -> str:
    last = output.strip().splitlines()[-1]
    assert last.startswith("parent_run_id: "), output
    return last.split(": ", 1)[1]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A 2x2 grid trained by two worker processes on one SQLite store."""
    store = tmp_path_factory.mktemp("grid")
    uri = f"sqlite:///{store}/mlflow.db"
    code, output = invoke("run", *GRID, "--name", "g2x2", "--tracking-uri", uri, "--workers", "2")
    assert code == 0, output
    return uri, parent_id_of(output), output


def test_plan_lists_cells_and_runs_nothing(tmp_path: Path) -> None:
    store = tmp_path / "none.db"
    code, output = invoke("plan", *GRID, "--tracking-uri", f"sqlite:///{store}")
    assert code == 0, output
    assert "L1-H2-E16-ctx16-s8-seed0" in output and "total: 4 cells" in output and "FLOPs" in output
    assert not store.exists(), "a plan creates no store"
    lines = output.splitlines()
    assert "non-emb" in lines[1] and "est. time" in lines[1]
    base = [line for line in lines if line.startswith("L2-H2-E16-ctx16-s16-seed0")]
    assert len(base) == 1 and base[0].split()[1] == "*", "the base cell (tiny.yaml's 2 layers, stride 1x) is marked"
    assert all(line.rstrip().endswith("no measurement") for line in lines[2:6])


def test_plan_estimates_time_from_finished_runs_of_the_same_shape(grid_run: tuple[str, str, str]) -> None:
    uri, _, _ = grid_run
    code, output = invoke("plan", *GRID, "--tracking-uri", uri)
    assert code == 0, output
    rows = [line for line in output.splitlines() if "-seed0" in line]
    # the stride changes the tokens of an epoch, not the model's speed: each shape has its two strides' runs
    assert len(rows) == 4 and all(line.rstrip().endswith("(2 runs)") for line in rows), output


def test_grid_makes_one_child_run_per_cell_with_factor_tags(grid_run: tuple[str, str, str]) -> None:
    uri, parent_id, output = grid_run
    runs = children(uri, parent_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    levels = {(r.data.tags["factor.model.n_layers"], r.data.tags["factor.data.stride"]) for r in runs}
    assert levels == {("1", "0.5x"), ("1", "1x"), ("2", "0.5x"), ("2", "1x")}
    strides = {r.data.params["data.stride"] for r in runs}
    assert strides == {"8", "16"}, "relative strides resolve against the context length"
    parent = MlflowClient(uri).get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ablation.grid"] == "g2x2"
    assert len(parent.data.tags["ablation.grid_id"]) == 16
    names = {r.info.run_name for r in runs}
    assert "n_layers=1 stride=0.5x seed=0, L1-H2-E16-ctx16-s8" in names, "names start with what varies"
    assert sum(line.startswith("start n_layers=") for line in output.splitlines()) == 4, "a line as each cell starts"


def test_parallel_workers_lose_no_metric_point(grid_run: tuple[str, str, str]) -> None:
    uri, parent_id, _ = grid_run
    client = MlflowClient(uri)
    for run in children(uri, parent_id):
        for key in EPOCH_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == [1, 2], f"{run.info.run_name}: {key} has steps {steps}"


def test_report_files_land_on_the_parent_run(grid_run: tuple[str, str, str]) -> None:
    uri, parent_id, output = grid_run
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "plots")
    }
    assert {"report.md", "report.html", "summary.csv", "grid.yaml", "plots/comparisons.png"} <= names, names
    assert "verdict:" in output and "val loss at matched tokens" in output
    report = Path(client.download_artifacts(parent_id, "report.md")).read_text()
    assert "data.stride" in report and "model.n_layers" in report


def test_running_the_same_grid_again_creates_no_new_child_runs(grid_run: tuple[str, str, str]) -> None:
    uri, parent_id, _ = grid_run
    code, output = invoke("run", *GRID, "--name", "g2x2", "--tracking-uri", uri)
    assert code == 0, output
    assert parent_id_of(output) == parent_id, "the grid resumes into its parent run"
    assert output.count("SKIPPED") == 4
    assert len(children(uri, parent_id)) == 4


def test_compare_rebuilds_the_report_from_mlflow(grid_run: tuple[str, str, str], tmp_path: Path) -> None:
    uri, parent_id, _ = grid_run
    code, output = invoke("compare", parent_id, "--tracking-uri", uri, "--out-dir", str(tmp_path))
    assert code == 0, output
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "report.md").is_file()
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Ablation: g2x2: n_layers x stride")
    # 2 epochs: stride 0.5x is first evaluated after more tokens than stride 1x ever sees
    assert "no comparison at matched tokens" in report and "Train at least 4 epochs" in report
    child = children(uri, parent_id)[0]
    summaries = {"summary/val_loss_at_common_epoch", "summary/tokens_to_target", "summary/final_val_loss"}
    assert summaries <= set(child.data.metrics), "sortable in MLflow's runs table"
    assert child.data.params["factor.data.stride"] in ("0.5x", "1x")


def test_two_grids_in_one_experiment_get_two_parents_and_share_only_an_identical_cell(tmp_path: Path) -> None:
    """The issue's reproduction: a second grid varying another factor must not adopt the first grid's parent."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [*TINY_GRID, "--data", str(VERDICT), "--seeds", "0", "--set", "train.epochs=1", "--experiment", "g"]
    code, first = invoke("run", *common, "--vary", "model.n_layers=1,2", "--tracking-uri", uri)
    assert code == 0, first
    code, second = invoke("run", *common, "--vary", "model.n_heads=1,2", "--tracking-uri", uri)
    assert code == 0, second
    first_id, second_id = parent_id_of(first), parent_id_of(second)
    assert first_id != second_id
    client = MlflowClient(uri)
    assert client.get_run(second_id).info.run_name == "n_heads", "named after what it varies"
    # tiny.yaml has 2 layers and 2 heads: that cell is the same experiment in both grids, and is reused
    shared = next(r for r in children(uri, first_id) if r.data.tags["factor.model.n_layers"] == "2")
    assert f"reused run {shared.info.run_id}" in second
    assert [r.data.tags["factor.model.n_heads"] for r in children(uri, second_id)] == ["1"], "only the new cell ran"
    report = Path(client.download_artifacts(second_id, "report.md")).read_text()
    assert "## Reused runs" in report and shared.info.run_id in report
    assert "model.n_layers" not in report, "no main effect of a factor the grid never varied"
    comparisons = pd.read_csv(client.download_artifacts(second_id, "comparisons.csv"))
    assert set(comparisons["factor"]) == {"model.n_heads"} and set(comparisons["base"].astype(str)) == {"2"}


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [a for a in GRID]
    args[args.index("model.n_layers=1,2")] = "train.lr=0.001,1e30"  # 1e30 drives the loss to NaN
    args[args.index("data.stride=0.5x,1x")] = "data.stride=1x"
    code, output = invoke("run", *args, "--set", "train.epochs=1", "--name", "fails", "--tracking-uri", uri)
    assert code == 1, output
    assert "1 cell(s) failed" in output and "lr1e+30" in output.split("cell(s) failed")[1]
    runs = {r.data.tags["factor.train.lr"]: r.info.status for r in children(uri, parent_id_of(output))}
    assert runs == {"0.001": "FINISHED", "1e+30": "FAILED"}


@pytest.mark.parametrize(
    ("grid_text", "message"),
    [
        ("- just\n- a list\n", "mapping"),
        ("vary: {model.n_layers: []}\n", "model.n_layers"),
        ("vary: {model.no_such_key: [1, 2]}\n", "no_such_key"),
        ("design: sideways\n", "design"),
        ("seeds: [zero]\n", "seeds"),
        ("colour: blue\n", "colour"),
        ("vary: {model.n_layers: [2, 2]}\n", "model.n_layers"),
    ],
)
def test_bad_grid_file_gives_one_line_error(tmp_path: Path, grid_text: str, message: str) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(grid_text)
    code, output = invoke("plan", str(grid), "--data", str(VERDICT))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], output
    assert_options_exist(lines[0], ablate.plan, [])


def test_missing_grid_file_and_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    for args, message in [
        (["plan", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (["run", *GRID, "--shard", "3/2", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "--shard"),
        (["run", *GRID, "--gpus", "a,b", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "--gpus"),
        (["compare", "no-such-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "no MLflow store"),
    ]:
        code, output = invoke(*args)
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], f"{args}: {output}"
        assert_options_exist(lines[0], ablate.main.commands[args[0]], args)


@pytest.mark.parametrize("command", ["run", "compare", "slurm"])
@pytest.mark.parametrize(("value", "message"), [("nan", "'nan' is not a finite number"),
                                                ("inf", "'inf' is not a finite number"),
                                                ("-1", "-1.0 is not in the range x>0")])  # fmt: skip
def test_target_loss_must_be_a_finite_positive_number(tmp_path: Path, monkeypatch, command, value, message) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["parent-id"] if command == "compare" else GRID
    code, output = invoke(command, *args, "--target-loss", value, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("error: Invalid value for '--target-loss'") and message in lines[0], output
    assert list(tmp_path.iterdir()) == [], "nothing is created for bad input"


def test_usage_errors_of_the_group_are_one_line() -> None:
    code, output = invoke("plot")
    assert code == 2 and output.strip() == "error: No such command 'plot'. (see --help)"


def bad_places(folder: Path) -> dict[str, str]:
    """Where no folder or file can be made -> the words its error must have; made in `folder`."""
    os.mkfifo(folder / "fifo")
    (folder / "broken").symlink_to(folder / "nowhere" / "x")
    (folder / "file.txt").write_text("a file")
    return {
        "/dev/null": "it is a device, pipe or socket",
        str(folder / "fifo"): "it is a device, pipe or socket",
        str(folder / "broken"): "it is a broken symbolic link",
        str(folder / "file.txt" / "sub"): f"{folder / 'file.txt'} is a file",
        "/proc/rep": "the file system there takes no new folders",
    }


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("place", ["/dev/null", "fifo", "broken", "file.txt/sub", "/proc/rep"])
def test_a_bad_out_dir_fails_before_anything_runs(tmp_path: Path, monkeypatch, command: str, place: str) -> None:
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    words = bad_places(inputs)
    out_dir = place if place.startswith("/") else str(inputs / place)
    args = ["parent-id"] if command == "compare" else GRID
    code, output = invoke(command, *args, "--tracking-uri", f"sqlite:///{work}/m.db", "--out-dir", out_dir)
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    expected = f"error: Invalid value for '--out-dir': cannot create the folder {out_dir}: {words[out_dir]}"
    assert lines[0].startswith(expected), output
    assert list(work.iterdir()) == [], "no store, no report: nothing is trained or written"
    assert sorted(p.name for p in inputs.iterdir()) == ["broken", "fifo", "file.txt"]


def test_a_report_that_cannot_be_written_loses_nothing(grid_run: tuple[str, str, str], tmp_path, monkeypatch) -> None:
    uri, parent_id, _ = grid_run
    out_dir = tmp_path / "report"

    def full_disk(*args: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # the disk fills up while the grid trains
        patch.setattr(report_module, "report_markdown", full_disk)
        code, output = invoke("run", *GRID, "--name", "g2x2", "--tracking-uri", uri, "--out-dir", str(out_dir))

    assert code == 5, output
    lines = output.strip().splitlines()
    assert lines[-1] == f"error: disk full: no space left on the device at {out_dir}", output
    assert lines[-2] == f"parent_run_id: {parent_id}" and "parent run FINISHED" in output, output
    again = f"ablate.py compare {parent_id} --tracking-uri {uri} --out-dir {out_dir}"
    assert f"the report was not written; every run of the grid is in MLflow: once the cause is fixed, make the " \
           f"report with: {again}" in output, output  # fmt: skip
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"

    code, output = invoke(*shlex.split(again)[1:])  # the command it gives makes the report
    assert code == 0, output
    assert (out_dir / "report.md").is_file() and "verdict:" in output
