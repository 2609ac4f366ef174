"""Ablation analysis: run metrics and main effects of synthetic grids with known answers, the report, MLflow."""

from __future__ import annotations

import math
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from gpt.ablation import analysis, report
from gpt.ablation.analysis import GridData, RunData
from gpt.errors import UserError

TOKENS_PER_EPOCH = 100_000
SECONDS_PER_EPOCH = 20.0


def curves(val: np.ndarray, tokens_per_epoch: int = TOKENS_PER_EPOCH, gap: float = 0.1) -> pd.DataFrame:
    epochs = np.arange(1, len(val) + 1)
    frame = pd.DataFrame(
        {
            "val_loss": val,
            "train_loss": val - gap,
            "tokens_seen": epochs * tokens_per_epoch,
            "wall_seconds": epochs * SECONDS_PER_EPOCH,
            "tokens_per_second": tokens_per_epoch / SECONDS_PER_EPOCH,
        },
        index=pd.Index(epochs, name="epoch"),
    )
    return frame.astype(float)


def power_law(a: float, b: float, c: float, tokens: np.ndarray) -> np.ndarray:
    return a + b * tokens ** (-c)


def fake_grid(
    asymptote: dict[str, float], seeds: int = 3, noise: float = 0.01, epochs: int = 12, base: str = "1x"
) -> GridData:
    """Two factors, data.stride (whose level sets the asymptote) and model.n_layers (no effect)."""
    rng = np.random.default_rng(0)
    runs = []
    for stride, a in asymptote.items():
        tokens_per_epoch = int(TOKENS_PER_EPOCH / float(stride.rstrip("x")))  # smaller stride: more windows
        for layers in ("2", "4"):
            for seed in range(seeds):
                tokens = np.arange(1, epochs + 1) * tokens_per_epoch
                val = power_law(a, 600.0, 0.5, tokens) + rng.normal(0, noise, epochs)
                runs.append(
                    RunData(
                        run_id=f"r{len(runs)}",
                        name=f"s{stride}-L{layers}-seed{seed}",
                        status="FINISHED",
                        cell_id=f"c-{stride}-{layers}",
                        seed=str(seed),
                        levels={"data.stride": stride, "model.n_layers": layers},
                        curves=curves(val, tokens_per_epoch),
                    )
                )
    return GridData(
        "parent", "synthetic", ["data.stride", "model.n_layers"], {"data.stride": base, "model.n_layers": "2"}, runs, []
    )


# ---------------------------------------------------------------- grid-level analysis


def test_default_target_is_the_worst_runs_best_val_loss_so_every_run_reaches_it():
    result = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}))
    assert result.target_loss == pytest.approx(result.runs["best_val_loss"].max())
    assert result.runs["tokens_to_target"].notna().all()
    given = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}), target_loss=3.2)
    assert given.target_source == "given"
    assert given.summary.set_index("data.stride").loc["1x", "reached_target"].eq(0).all()


def test_main_effects_find_the_factor_that_matters_and_not_the_one_that_does_not():
    result = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}))
    effects = result.effects.set_index(["factor", "level"])
    stride = effects.loc[("data.stride", "0.5x")]
    assert stride["test"] == "paired t" and stride["p_value"] < 0.05, stride.to_dict()
    # at the last epoch stride 0.5x has also seen twice the tokens, on top of its 0.3 nats lower asymptote
    expected = power_law(3.0, 600.0, 0.5, 24 * TOKENS_PER_EPOCH) - power_law(3.3, 600.0, 0.5, 12 * TOKENS_PER_EPOCH)
    assert stride["delta"] == pytest.approx(expected, abs=0.03)
    assert effects.loc[("data.stride", "1x"), "base"], "the base level comes from the parent's tag"
    assert effects.loc[("model.n_layers", "4"), "p_value"] > 0.05, "n_layers has no effect in the data"
    assert effects.loc[("data.stride", "1x"), "mean"] == pytest.approx(
        power_law(3.3, 600.0, 0.5, 12 * TOKENS_PER_EPOCH), abs=0.03
    ), "the marginal mean is the last epoch's loss"


def test_base_level_falls_back_to_the_first_level_with_a_note():
    base, notes = analysis.resolve_base_levels(
        {"data.stride": ["0.5x", "1x"], "train.lr": ["0.001", "0.002"]}, {"data.stride": "2x", "train.lr": "1e-3"}
    )
    assert base == {"data.stride": "0.5x", "train.lr": "0.001"}, "numbers match by value (1e-3 == 0.001)"
    assert len(notes) == 1 and "2x" in notes[0]
    base, _ = analysis.resolve_base_levels({"data.stride": ["1", "1x"]}, {"data.stride": "1.0x"})
    assert base == {"data.stride": "1x"}, "a ratio never matches a token count"


def test_one_at_a_time_grid_compares_each_level_with_the_base_runs_only():
    # base cell (stride 1x, 2 layers) plus one cell per changed factor; n_layers=4 is much worse, and it
    # must not leak into the stride comparison through the (1x, 4) cell.
    rng = np.random.default_rng(5)
    cells = {("1x", "2"): 3.3, ("0.5x", "2"): 3.0, ("1x", "4"): 4.0}
    runs = [
        RunData(
            f"{s}{layers}{seed}",
            f"{s}-{layers}-{seed}",
            "FINISHED",
            f"{s}-{layers}",
            str(seed),
            {"data.stride": s, "model.n_layers": layers},
            curves(power_law(a, 600.0, 0.5, np.arange(1, 11) * TOKENS_PER_EPOCH) + rng.normal(0, 0.01, 10)),
        )
        for (s, layers), a in cells.items()
        for seed in range(3)
    ]
    grid = GridData(
        "parent", "ofat", ["data.stride", "model.n_layers"], {"data.stride": "1x", "model.n_layers": "2"}, runs, []
    )
    effects = analysis.analyze(grid).effects.set_index(["factor", "level"])
    assert effects.loc[("data.stride", "1x"), "runs"] == 3, "only the base cell's runs"
    assert effects.loc[("data.stride", "0.5x"), "delta"] == pytest.approx(-0.3, abs=0.05)
    assert effects.loc[("model.n_layers", "4"), "delta"] == pytest.approx(0.7, abs=0.05)


def test_overfitting_cell_is_flagged_and_fitted_up_to_its_minimum():
    grid = fake_grid({"1x": 3.3}, seeds=2, noise=0.0)
    rising = grid.runs[0].curves.copy()
    rising.loc[9:, "val_loss"] = rising.loc[8, "val_loss"] + 0.05 * np.arange(1, 5)
    grid.runs[0].curves = rising
    runs = analysis.analyze(grid).runs.set_index("run_id")
    assert runs.loc["r0", "overfit_epoch"] == 8 and math.isnan(runs.loc["r1", "overfit_epoch"])
    assert runs.loc["r0", "fit_a"] == pytest.approx(3.3, abs=0.01), "the fit ignores the rising tail"


def test_write_report_writes_markdown_csv_and_one_plot_per_factor(tmp_path):
    grid = fake_grid({"0.5x": 3.0, "1x": 3.3})
    grid.others.append(RunData("dead", "s1x-L2-seed9", "FAILED", "c-1x-2", "9", {"data.stride": "1x"}))
    files = report.write_report(analysis.analyze(grid), tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {
        "report.md",
        "summary.csv",
        "runs.csv",
        "main_effects.csv",
        "plots/curves_data.stride.png",
        "plots/curves_model.n_layers.png",
        "plots/main_effects.png",
    } == names
    assert all(p.stat().st_size > 0 for p in files)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 4 and (summary["seeds"] == 3).all()
    assert {"best_val_loss_mean", "best_val_loss_ci95", "tokens_to_target_mean", "train_val_gap_mean"} <= set(summary)
    markdown = (tmp_path / "report.md").read_text()
    assert "FAILED" in markdown and "s1x-L2-seed9" in markdown, "unfinished runs are listed"
    assert "plots/curves_data.stride.png" in markdown


def test_terminal_table_has_one_line_per_cell_and_the_p_values():
    table = report.format_table(analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3})))
    lines = table.splitlines()
    assert sum(line.startswith(("0.5x", "1x ")) for line in lines) == 4, table
    assert "paired t" in table and "target val loss" in table


def test_a_grid_without_finished_runs_still_gets_a_report(tmp_path):
    grid = GridData(
        "parent", "empty", ["data.stride"], {}, [], [RunData("x", "only", "FAILED", "c", "0", {"data.stride": "1x"})]
    )
    files = report.write_report(analysis.analyze(grid), tmp_path)
    assert [p.name for p in files] == ["report.md"] and "only" in files[0].read_text()
    assert "no finished child run" in report.format_table(analysis.analyze(grid))


# ---------------------------------------------------------------- MLflow end to end


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating its schema takes seconds."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        uri = f"sqlite:///{folder}/mlflow.db"
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri writes it too; the patch restores it after
        mlflow.set_tracking_uri(uri)
        yield uri, folder
        mlflow.set_tracking_uri(None)  # later test files must not inherit this store


def test_fetch_write_and_log_report_end_to_end(tmp_path, store):
    tracking_uri, folder = store
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("ablation", artifact_location=(folder / "artifacts").as_uri())
    parent_tags = {"ablation.grid": "tiny", "ablation.base.data.stride": "1x"}
    parent = client.create_run(experiment, run_name="grid", tags=parent_tags)
    parent_id = parent.info.run_id
    now = int(time.time() * 1000)
    cells = [
        ("0.5x", 3.0, ["FINISHED", "FINISHED"]),
        ("1x", 3.3, ["FINISHED", "FINISHED"]),
        ("2x", 3.6, ["FAILED", "RUNNING"]),
    ]
    for stride, a, statuses in cells:
        for seed, status in enumerate(statuses):
            tags = {
                "mlflow.parentRunId": parent_id,
                "ablation.cell_id": f"c{stride}",
                "ablation.seed": str(seed),
                "ablation.factors": "data.stride",
                "factor.data.stride": stride,
            }
            run_id = client.create_run(experiment, run_name=f"s{stride}-seed{seed}", tags=tags).info.run_id
            frame = curves(power_law(a, 600.0, 0.5, np.arange(1, 7) * TOKENS_PER_EPOCH) + 0.01 * seed)
            metrics = [
                Metric(key, float(value), now, int(epoch))
                for epoch, row in frame.iterrows()
                for key, value in row.items()
            ]
            client.log_batch(run_id, metrics=metrics, params=[mlflow.entities.Param("train.seed", str(seed))])
            if status != "RUNNING":
                client.set_terminated(run_id, status)
    client.create_run(experiment, run_name="other grid", tags={"mlflow.parentRunId": "someone-else"})

    grid = analysis.fetch_grid(parent_id, tracking_uri)
    assert grid.grid_name == "tiny" and grid.factors == ["data.stride"] and grid.base_levels == {"data.stride": "1x"}
    assert len(grid.runs) == 4 and sorted(r.status for r in grid.others) == ["FAILED", "RUNNING"]
    first = next(r for r in grid.runs if r.name == "s0.5x-seed0")
    assert list(first.curves.index) == [1, 2, 3, 4, 5, 6]
    assert first.curves.loc[6, "tokens_seen"] == 6 * TOKENS_PER_EPOCH

    files = report.write_report(analysis.analyze(grid), tmp_path / "report")
    report.log_report(parent_id, files, tracking_uri)
    root = {a.path for a in client.list_artifacts(parent_id)}
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"report.md", "summary.csv"} <= root
    assert {"plots/curves_data.stride.png", "plots/main_effects.png"} <= plots

    table, _ = report.compare(parent_id, tmp_path / "again", tracking_uri, target_loss=3.9, log=False)
    assert "target val loss 3.9000 nats (given)" in table and "2 not finished" in table


def test_fetch_grid_names_an_unknown_run(store):
    with pytest.raises(UserError, match="cannot read run 0123abcd"):
        analysis.fetch_grid("0123abcd", store[0])
    with pytest.raises(UserError, match="malformed"):
        analysis.fetch_grid("x' OR '1'='1", store[0])
