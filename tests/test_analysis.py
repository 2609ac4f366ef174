"""Ablation analysis: statistics on synthetic curves with known answers, the report, and MLflow end to end."""

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


# ---------------------------------------------------------------- convergence fit


def test_fit_recovers_known_parameters_from_a_noiseless_curve():
    tokens = np.arange(1, 41) * TOKENS_PER_EPOCH
    fit = analysis.fit_convergence(tokens, power_law(3.0, 950.0, 0.5, tokens))
    assert fit.error == ""
    assert fit.a == pytest.approx(3.0, abs=1e-3), fit
    assert fit.b == pytest.approx(950.0, rel=1e-2), fit
    assert fit.c == pytest.approx(0.5, abs=1e-3), fit


def test_fit_recovers_parameters_from_a_mildly_noisy_curve_within_its_standard_errors():
    tokens = np.arange(1, 41) * TOKENS_PER_EPOCH
    loss = power_law(3.0, 950.0, 0.5, tokens) + np.random.default_rng(1).normal(0, 0.005, len(tokens))
    fit = analysis.fit_convergence(tokens, loss)
    assert fit.error == ""
    assert abs(fit.a - 3.0) < max(0.1, 3 * fit.a_se), f"asymptote {fit.a} ± {fit.a_se}, expected 3.0"
    assert abs(fit.c - 0.5) < max(0.1, 3 * fit.c_se), f"rate {fit.c} ± {fit.c_se}, expected 0.5"
    assert 0 < fit.a_se < 0.2 and 0 < fit.c_se < 0.2


@pytest.mark.parametrize(
    "tokens, loss, reason",
    [
        ([1e5, 2e5, 3e5], [5.0, 4.0, 3.5], "needs at least 4"),
        ([1e5, 2e5, 3e5, 4e5], [4.0, 4.0, 4.0, 4.0], "flat curve"),
        ([1e5, 2e5, np.nan, 4e5], [5.0, np.nan, 4.0, 3.9], "needs at least 4"),
    ],
)
def test_fit_reports_failure_instead_of_raising(tokens, loss, reason):
    fit = analysis.fit_convergence(tokens, loss)
    assert reason in fit.error and math.isnan(fit.a)


# ---------------------------------------------------------------- intervals and tests


def test_confidence_interval_is_the_student_t_interval():
    estimate = analysis.mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, df=2) = 4.3027
    assert estimate.mean == pytest.approx(2.0)
    assert estimate.ci95 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert math.isnan(analysis.mean_ci([1.0]).ci95) and analysis.mean_ci([np.nan, 2.0]).n == 1


def test_confidence_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    samples = rng.normal(4.0, 0.05, size=(1000, 3))
    covered = [abs(e.mean - 4.0) <= e.ci95 for e in map(analysis.mean_ci, samples)]
    assert 0.925 < np.mean(covered) < 0.975, f"coverage {np.mean(covered):.3f}, expected about 0.95"


def test_a_real_difference_between_levels_is_significant():
    rng = np.random.default_rng(3)
    base = {("", seed): 3.3 + rng.normal(0, 0.02) for seed in "012"}
    level = {("", seed): 3.0 + rng.normal(0, 0.02) for seed in "012"}
    comparison = analysis.compare_to_base(base, level)
    assert comparison.test == "paired t" and comparison.n == 3
    assert comparison.p_value < 0.05, comparison
    assert comparison.delta == pytest.approx(-0.3, abs=0.05)
    assert abs(comparison.delta + 0.3) <= comparison.ci95 + 0.05


def test_pure_noise_is_rarely_significant():
    rng = np.random.default_rng(4)
    p_values = [
        analysis.compare_to_base(
            dict(enumerate(rng.normal(3.0, 0.02, 3))), dict(enumerate(rng.normal(3.0, 0.02, 3)))
        ).p_value
        for _ in range(400)
    ]
    assert np.mean(np.array(p_values) < 0.05) < 0.09, "the test rejects noise more often than its 5% level"


def test_unmatched_seeds_use_welch_and_single_runs_get_no_test():
    welch = analysis.compare_to_base({0: 3.3, 1: 3.31, 2: 3.29}, {3: 3.0, 4: 3.02})
    assert welch.test == "Welch t" and welch.p_value < 0.05
    assert analysis.compare_to_base({0: 3.3}, {0: 3.0}).test == "too few runs"


# ---------------------------------------------------------------- curves


def test_overfitting_is_flagged_at_the_epoch_of_lowest_val_loss():
    val = [5.0, 4.2, 3.8, 3.6, 3.65, 3.8, 4.0]
    assert analysis.overfit_epoch(range(1, 8), val) == 4
    assert analysis.overfit_epoch(range(1, 8), [5.0, 4.0, 3.5, 3.2, 3.1, 3.05, 3.0]) is None
    assert analysis.overfit_epoch(range(1, 5), [5.0, 4.0, 3.5, 3.505]) is None, "a rise within tolerance is noise"
    assert analysis.overfit_epoch([2, 4, 6, 8], [5.0, 4.0, 4.5, 4.6]) == 4, "epochs come from the index, not positions"


def test_tokens_to_target_interpolates_the_first_crossing():
    tokens = [100, 200, 300, 400, 500]
    loss = [5.0, 4.0, 3.0, 3.6, 2.5]
    assert analysis.first_crossing(tokens, loss, 3.5) == pytest.approx(250.0), "halfway between 4.0 and 3.0"
    assert analysis.first_crossing(tokens, loss, 3.0) == pytest.approx(300.0)
    assert analysis.first_crossing(tokens, loss, 6.0) == 100.0, "already below at the first logged epoch"
    assert analysis.first_crossing(tokens, loss, 2.7) == pytest.approx(500 - 100 * 0.2 / 1.1)
    assert math.isnan(analysis.first_crossing(tokens, loss, 2.0))


def test_default_target_is_the_worst_runs_best_val_loss_so_every_run_reaches_it():
    result = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}))
    assert result.target_loss == pytest.approx(result.runs["best_val_loss"].max())
    assert result.runs["tokens_to_target"].notna().all()
    given = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}), target_loss=3.2)
    assert given.target_source == "given"
    assert given.summary.set_index("data.stride").loc["1x", "reached_target"].eq(0).all()


# ---------------------------------------------------------------- grid-level analysis


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
