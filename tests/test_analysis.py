"""Ablation analysis on grids with known answers: matched compute, confounds, ANOVA, verdict, report, MLflow.

The synthetic runs follow L(t) = a + b t^-c in training tokens t, so the loss of any run at any
budget is known exactly; the planted-effects test writes such histories straight into a SQLite
store (no training) and reads the whole report back.
"""

from __future__ import annotations

import itertools
import math
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from gpt.ablation import analysis, report
from gpt.ablation.analysis import GridData, RunData
from gpt.ablation.grid import Cell
from gpt.ablation.identity import REUSED_TAG, reuse_tag_value
from gpt.config import Config
from gpt.errors import UserError

TOKENS_PER_EPOCH = 100_000
SECONDS_PER_EPOCH = 20.0
B, C = 600.0, 0.5  # every synthetic curve: a + B t^-C


def power_law(a: float, tokens: np.ndarray, b: float = B, c: float = C) -> np.ndarray:
    return a + b * np.asarray(tokens, dtype=float) ** (-c)


def curves(val: np.ndarray, tokens_per_epoch: int = TOKENS_PER_EPOCH, gap: float = 0.1) -> pd.DataFrame:
    epochs = np.arange(1, len(val) + 1)
    frame = pd.DataFrame(
        {
            "val_loss": val,
            "train_loss": val - gap,
            "tokens_seen": epochs * tokens_per_epoch,
            "wall_seconds": epochs * SECONDS_PER_EPOCH * tokens_per_epoch / TOKENS_PER_EPOCH,
            "tokens_per_second": TOKENS_PER_EPOCH / SECONDS_PER_EPOCH,
        },
        index=pd.Index(epochs, name="epoch"),
    )
    return frame.astype(float)


def run_params(tokens_per_epoch: int, flops_per_token: float = 1e6, steps_per_epoch: int = 50) -> dict[str, str]:
    return {
        "n_params": "3242752",
        "model.vocab_size": "50257",
        "model.emb_dim": "32",
        "model.context_length": "32",
        "model.tie_weights": "False",
        "flops_per_token": str(flops_per_token),
        "tokens_per_epoch": str(tokens_per_epoch),
        "steps_per_epoch": str(steps_per_epoch),
        "train.lr": "0.002",
        "train.lr_schedule": "constant",
        "train.batch_size": "16",
        "device": "cpu",
    }


def fake_grid(
    asymptote: dict[str, float], seeds: int = 3, noise: float = 0.01, epochs: int = 12, base: str = "1x"
) -> GridData:
    """Two factors, data.stride (whose level sets the asymptote and the tokens per epoch) and model.n_layers (none)."""
    rng = np.random.default_rng(0)
    runs = []
    for stride, a in asymptote.items():
        tokens_per_epoch = int(TOKENS_PER_EPOCH / float(stride.rstrip("x")))  # smaller stride: more windows
        for layers in ("2", "4"):
            for seed in range(seeds):
                tokens = np.arange(1, epochs + 1) * tokens_per_epoch
                val = power_law(a, tokens) + rng.normal(0, noise, epochs)
                runs.append(
                    RunData(
                        run_id=f"r{len(runs)}",
                        name=f"s{stride}-L{layers}-seed{seed}",
                        status="FINISHED",
                        cell_id=f"c-{stride}-{layers}",
                        seed=str(seed),
                        levels={"data.stride": stride, "model.n_layers": layers},
                        curves=curves(val, tokens_per_epoch),
                        params=run_params(tokens_per_epoch),
                    )
                )
    return GridData(
        "parent", "synthetic", ["data.stride", "model.n_layers"], {"data.stride": base, "model.n_layers": "2"}, runs, []
    )


def compared(result: analysis.Analysis) -> pd.DataFrame:
    return result.comparisons.set_index(["factor", "level", "measure"]).sort_index()


# ---------------------------------------------------------------- grid-level analysis


def test_default_target_is_the_worst_runs_best_val_loss_so_every_run_reaches_it():
    result = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}))
    assert result.target_loss == pytest.approx(result.runs["best_val_loss"].max())
    assert result.runs["tokens_to_target"].notna().all()
    given = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}), target_loss=3.2)
    assert given.target_source == "given"
    assert given.summary.set_index("data.stride").loc["1x", "reached_target"].eq(0).all()


def test_matched_tokens_measure_the_planted_effect_and_equal_epochs_add_the_extra_tokens():
    result = analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3}))
    rows = compared(result)
    budget = 12 * TOKENS_PER_EPOCH  # the 1x runs' last evaluation: the most every run reached
    assert result.matching.tokens.value == budget
    tokens = rows.loc[("data.stride", "0.5x", "tokens")]
    assert tokens["test"] == "paired t" and tokens["n"] == 6 and tokens["p_holm"] < 0.05
    assert tokens["estimate"] == pytest.approx(-0.3, abs=0.02), "the asymptotes' difference: same curve in tokens"
    assert tokens["low"] < tokens["estimate"] < tokens["high"]
    # at epoch 12 stride 0.5x has also seen twice the tokens, on top of its 0.3 nats lower asymptote
    epochs = rows.loc[("data.stride", "0.5x", "epochs")]
    expected = power_law(3.0, 2 * budget) - power_law(3.3, budget)
    assert epochs["estimate"] == pytest.approx(expected, abs=0.02)
    assert rows.loc[("data.stride", "0.5x", "wall"), "estimate"] == pytest.approx(2.0), "twice the tokens per epoch"
    assert math.isnan(rows.loc[("data.stride", "0.5x", "wall"), "p_value"]), "wall time is not tested"
    assert rows.loc[("model.n_layers", "4", "tokens"), "p_holm"] > 0.05, "n_layers has no effect in the data"
    assert ("data.stride", "0.5x", "flops") not in rows.index, "the same model: matched FLOPs are matched tokens"


def test_a_setting_that_only_sees_more_tokens_per_epoch_is_not_called_better():
    """The confound of the issue: stride 0.5x is -0.47 nats at equal epochs and nothing per token."""
    result = analysis.analyze(fake_grid({"0.5x": 3.3, "1x": 3.3}, noise=0.005))
    rows = compared(result)
    assert rows.loc[("data.stride", "0.5x", "epochs"), "p_holm"] < 0.05, "at equal epochs it looks better"
    assert rows.loc[("data.stride", "0.5x", "tokens"), "p_holm"] > 0.05, "per token it is not"
    assert rows.loc[("data.stride", "0.5x", "tokens_to_target"), "estimate"] == pytest.approx(1.0, abs=0.1)
    line = next(line for line in report.verdict(result) if line.startswith("stride 0.5x vs 1x"))
    assert line.split(",")[0] == "stride 0.5x vs 1x: no detectable difference per token", line
    assert "n.s." in line and "2x the tokens per epoch" in line and "2x the wall time per epoch" in line
    assert "keep stride=1x" in line


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
            curves(power_law(a, np.arange(1, 11) * TOKENS_PER_EPOCH) + rng.normal(0, 0.01, 10)),
        )
        for (s, layers), a in cells.items()
        for seed in range(3)
    ]
    base = {"data.stride": "1x", "model.n_layers": "2"}
    grid = GridData("parent", "ofat", ["data.stride", "model.n_layers"], base, runs, [], design="one-at-a-time")
    result = analysis.analyze(grid)
    rows = compared(result)
    assert rows.loc[("data.stride", "0.5x", "tokens"), "n"] == 3, "only the base cell's runs"
    assert rows.loc[("data.stride", "0.5x", "tokens"), "estimate"] == pytest.approx(-0.3, abs=0.05)
    assert rows.loc[("model.n_layers", "4", "tokens"), "estimate"] == pytest.approx(0.7, abs=0.05)
    assert result.anova.empty and "one-at-a-time" in result.anova_note


def test_overfitting_cell_is_flagged_and_fitted_up_to_its_minimum():
    grid = fake_grid({"1x": 3.3}, seeds=2, noise=0.0)
    rising = grid.runs[0].curves.copy()
    rising.loc[9:, "val_loss"] = rising.loc[8, "val_loss"] + 0.05 * np.arange(1, 5)
    grid.runs[0].curves = rising
    runs = analysis.analyze(grid).runs.set_index("run_id")
    assert runs.loc["r0", "overfit_epoch"] == 8 and math.isnan(runs.loc["r1", "overfit_epoch"])
    assert runs.loc["r0", "fit_a"] == pytest.approx(3.3, abs=0.01), "the fit ignores the rising tail"


def test_short_runs_warn_that_fits_and_matched_tokens_are_impossible_and_say_how_many_epochs_would_do():
    result = analysis.analyze(fake_grid({"0.25x": 3.0, "1x": 3.3}, epochs=3))
    warnings = report.cautions(result)
    assert math.isnan(result.matching.tokens.value), "1x ends at 300k tokens, 0.25x starts at 400k"
    matched = next(w for w in warnings if w.startswith("no comparison at matched tokens"))
    assert "train at least 5 epochs" in matched.lower(), matched
    fits = next(w for w in warnings if w.startswith("convergence fits impossible"))
    assert "3 validation points" in fits and "at least 4 epochs" in fits
    assert any(w.startswith("not converged: 12 of 12 runs") for w in warnings), warnings
    assert result.anova_measure == "epochs", "without matched tokens the ANOVA is of the equal-epoch loss"


def test_wall_times_of_runs_that_shared_a_device_are_flagged():
    grid = fake_grid({"0.5x": 3.0, "1x": 3.3})
    for i, run in enumerate(grid.runs):
        run.tags = {"ablation.host": "h"}
        run.start_time, run.end_time = 1000.0 + 100 * (i // 2), 1090.0 + 100 * (i // 2)  # two at a time
    result = analysis.analyze(grid)
    assert result.runs["concurrent_runs"].tolist() == [1] * 12
    warning = next(w for w in report.cautions(result) if w.startswith("wall times are machine-dependent"))
    assert "12 of 12 runs" in warning and "up to 2 at once" in warning


def test_write_report_writes_markdown_html_csv_and_plots(tmp_path):
    grid = fake_grid({"0.5x": 3.0, "1x": 3.3})
    grid.others.append(RunData("dead", "s1x-L2-seed9", "FAILED", "c-1x-2", "9", {"data.stride": "1x"}))
    files = report.write_report(analysis.analyze(grid), tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {
        "report.md",
        "report.html",
        "summary.csv",
        "runs.csv",
        "comparisons.csv",
        "anova.csv",
        "plots/curves_data.stride.png",
        "plots/curves_model.n_layers.png",
        "plots/comparisons.png",
    } == names
    assert all(p.stat().st_size > 0 for p in files)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 4 and (summary["seeds"] == 3).all()
    assert {"val_at_tokens_mean", "val_at_tokens_ci95", "tokens_to_target_mean", "non_embedding_params"} <= set(summary)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.index("## Verdict") < markdown.index("## Warnings") < markdown.index("## Setup")
    assert "FAILED" in markdown and "s1x-L2-seed9" in markdown, "unfinished runs are listed"
    assert "Held fixed in every run: lr 0.002, constant schedule, batch 16 windows" in markdown
    assert "plots/curves_data.stride.png" in markdown
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "<table>" in page and "plots/" not in page


def test_terminal_table_opens_with_the_verdict_and_has_one_line_per_cell():
    table = report.format_table(analysis.analyze(fake_grid({"0.5x": 3.0, "1x": 3.3})))
    lines = table.splitlines()
    assert lines[2] == "verdict:" and lines[3].startswith("  stride 0.5x vs 1x: better per token")
    assert sum(line.startswith(("0.5x", "1x ")) for line in lines) == 4, table
    assert "paired t" in table and "val loss at matched tokens" in table


def test_a_grid_without_finished_runs_still_gets_a_report(tmp_path):
    grid = GridData(
        "parent", "empty", ["data.stride"], {}, [], [RunData("x", "only", "FAILED", "c", "0", {"data.stride": "1x"})]
    )
    files = report.write_report(analysis.analyze(grid), tmp_path)
    assert [p.name for p in files] == ["report.md", "report.html"] and "only" in files[0].read_text()
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


def write_run(client: MlflowClient, experiment: str, parent_id: str, levels: dict, seed: int, history: dict) -> str:
    """A finished child run with the tags of a grid cell, the params a training logs, and metric histories."""
    tags = {
        "mlflow.parentRunId": parent_id,
        "ablation.cell_id": "c-" + "-".join(levels.values()),
        "ablation.seed": str(seed),
        "ablation.factors": ",".join(levels),
        **{f"factor.{key}": value for key, value in levels.items()},
    }
    name = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in levels.items()) + f" seed={seed}"
    run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(v), now, int(step)) for key, series in history["metrics"].items() for step, v in series
    ]
    params = [Param(k, v) for k, v in history["params"].items()]
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 900], params=params if start == 0 else [])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def planted_history(a: float, tokens_per_epoch: int, flops_per_token: float, rng, epochs: int = 8) -> dict:
    """Per-epoch val/train loss on a + B t^-C with noise, and per-step training losses every 10 steps."""
    steps_per_epoch = 50
    tokens = np.arange(1, epochs + 1) * tokens_per_epoch
    val = power_law(a, tokens) + rng.normal(0, 0.004, epochs)
    step_numbers = np.arange(10, epochs * steps_per_epoch + 1, 10)
    step_loss = power_law(a - 0.1, step_numbers * tokens_per_epoch / steps_per_epoch) + rng.normal(
        0, 0.01, len(step_numbers)
    )
    epoch_index = range(1, epochs + 1)
    return {
        "metrics": {
            "val_loss": list(zip(epoch_index, val, strict=True)),
            "train_loss": list(zip(epoch_index, val - 0.1, strict=True)),
            "tokens_seen": list(zip(epoch_index, tokens, strict=True)),
            "wall_seconds": list(zip(epoch_index, tokens / 5000, strict=True)),
            "tokens_per_second": [(e, 5000.0) for e in epoch_index],
            "train_loss_step": list(zip(step_numbers, step_loss, strict=True)),
        },
        "params": run_params(tokens_per_epoch, flops_per_token, steps_per_epoch),
    }


T = 50_000  # tokens per epoch at stride 1x


def planted_asymptote(layers: str, lr: str) -> float:
    """Depth helps (-0.2), the larger lr helps (-0.1), and both together help 0.15 more: an interaction."""
    return 3.3 - 0.2 * (layers == "2") - 0.1 * (lr == "0.004") - 0.15 * (layers == "2" and lr == "0.004")


@pytest.fixture(scope="module")
def planted(store, tmp_path_factory):
    """A 2x2x2 grid x 3 seeds written straight into the store, and its report (compare, logged)."""
    uri, folder = store
    client = MlflowClient(uri)
    experiment = client.create_experiment("planted", artifact_location=(folder / "planted").as_uri())
    factors = ["model.n_layers", "train.lr", "data.stride"]
    parent_tags = {
        "ablation.grid": "planted",
        "ablation.role": "parent",
        "ablation.design": "grid",
        "ablation.factors": ",".join(factors),
        "ablation.base.model.n_layers": "1",
        "ablation.base.train.lr": "0.002",
        "ablation.base.data.stride": "1x",
    }
    parent_id = client.create_run(experiment, run_name="planted", tags=parent_tags).info.run_id
    rng = np.random.default_rng(11)
    for layers, lr, stride in itertools.product(("1", "2"), ("0.002", "0.004"), ("0.5x", "1x")):
        for seed in range(3):
            # stride 0.5x: twice the windows, so twice the tokens per epoch, on the very same curve in tokens
            history = planted_history(
                planted_asymptote(layers, lr), T * (2 if stride == "0.5x" else 1), 1e6 * int(layers), rng
            )
            levels = {"model.n_layers": layers, "train.lr": lr, "data.stride": stride}
            write_run(client, experiment, parent_id, levels, seed, history)
    out = tmp_path_factory.mktemp("planted-report")
    text, files = report.compare(parent_id, out, uri)
    result = analysis.analyze(analysis.fetch_grid(parent_id, uri))
    return uri, parent_id, result, text, out


def test_the_report_recovers_planted_effects_at_matched_tokens(planted):
    _, _, result, _, _ = planted
    rows = compared(result)
    assert result.matching.tokens.value == 8 * T and result.matching.epoch == 8
    depth = rows.loc[("model.n_layers", "2", "tokens")]
    assert depth["estimate"] == pytest.approx(-0.2 - 0.15 / 2, abs=0.01), "averaged over both learning rates"
    assert depth["n"] == 12 and depth["p_holm"] < 0.05
    lr = rows.loc[("train.lr", "0.004", "tokens")]
    assert lr["estimate"] == pytest.approx(-0.1 - 0.15 / 2, abs=0.01) and lr["p_holm"] < 0.05


def test_a_planted_confound_is_no_effect_at_matched_tokens(planted):
    _, _, result, text, _ = planted
    rows = compared(result)
    stride = rows.loc[("data.stride", "0.5x")]
    assert stride.loc["epochs", "estimate"] == pytest.approx(power_law(0, 16 * T) - power_law(0, 8 * T), abs=0.01), (
        "at equal epochs: only the extra tokens"
    )
    assert stride.loc["epochs", "p_holm"] < 0.05
    assert abs(stride.loc["tokens", "estimate"]) < 0.01 and stride.loc["tokens", "p_holm"] > 0.05
    assert "stride 0.5x vs 1x: no detectable difference per token" in text


def test_depth_is_better_per_token_but_worse_per_flop_when_it_doubles_the_flops(planted):
    _, _, result, text, _ = planted
    flops = compared(result).loc[("model.n_layers", "2", "flops")]
    # at the FLOPs of 8 epochs of the 1-layer model the 2-layer model has seen half the tokens
    expected = -0.2 - 0.15 / 2 + power_law(0, 4 * T) - power_law(0, 8 * T)
    assert flops["estimate"] == pytest.approx(expected, abs=0.01) and flops["p_holm"] < 0.05
    line = next(line for line in text.splitlines() if line.strip().startswith("n_layers 2 vs 1"))
    assert "worse per FLOP" in line and "better per token" in line, line
    assert ("train.lr", "0.004", "flops") not in compared(result).index, "the learning rate leaves the FLOPs alone"


def test_the_anova_finds_the_planted_interaction_and_nothing_else(planted):
    _, _, result, _, _ = planted
    anova = result.anova.set_index("term")
    assert result.anova_measure == "tokens"
    significant = set(anova.index[anova["p_holm"] < 0.05])
    assert significant == {"model.n_layers", "train.lr", "model.n_layers × train.lr"}, anova
    assert anova.loc["model.n_layers × train.lr", "partial_eta_sq"] > 0.9
    assert anova.loc["residual", "df"] == 24 - 1 - 6, "24 runs, an intercept, 3 main effects, 3 interactions"


def test_the_report_and_each_childs_summary_metrics_land_in_mlflow(planted):
    uri, parent_id, result, _, out = planted
    client = MlflowClient(uri)
    root = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.md", "report.html", "summary.csv", "comparisons.csv", "anova.csv"} <= root
    assert {"plots/comparisons.png"} <= {a.path for a in client.list_artifacts(parent_id, "plots")}
    child = client.get_run(result.runs["run_id"].iloc[0])
    row = result.runs.iloc[0]
    assert child.data.metrics["summary/val_loss_at_matched_tokens"] == pytest.approx(row["val_at_tokens"])
    assert child.data.metrics["summary/tokens_to_target"] == pytest.approx(row["tokens_to_target"])
    summaries = {"best_val_loss", "best_epoch", "summary/val_loss_at_common_epoch", "summary/final_val_loss"}
    assert summaries <= set(child.data.metrics)
    assert child.data.params["factor.data.stride"] == row["data.stride"], "the level as a param, for MLflow's compare"
    assert child.data.params["non_embedding_params"] == str(3242752 - 2 * 50257 * 32 - 32 * 32)


def test_convergence_fits_recover_the_planted_asymptotes_within_their_errors(planted):
    runs = planted[2].runs
    assert (runs["step_fit_error"].fillna("") == "").all(), "40 points on a power law: the per-step fit is a result"
    planted_a = runs.apply(lambda r: planted_asymptote(r["model.n_layers"], r["train.lr"]), axis=1)
    step_error = (runs["step_fit_a"] - (planted_a - 0.1)).abs()  # the step losses sit 0.1 below the val losses
    assert (step_error <= 3 * runs["step_fit_a_se"] + 0.01).all(), step_error
    identified = runs[runs["fit_error"].fillna("") == ""]
    assert len(identified) >= len(runs) // 2, runs["fit_error"].value_counts()
    error = (identified["fit_a"] - planted_a[identified.index]).abs()
    # 8 noisy points per run: the asymptotic standard errors are rough, but most intervals must hold the truth
    assert (error <= 2 * identified["fit_a_se"]).mean() >= 0.75, pd.DataFrame(
        {"error": error, "se": identified["fit_a_se"]}
    )


def test_a_reused_run_enters_the_report_with_this_grids_levels(store, planted, tmp_path):
    uri, first_parent, result, _, _ = planted
    client = MlflowClient(uri)
    experiment = client.get_run(first_parent).info.experiment_id
    donor = result.grid.runs[0]
    tags = {"ablation.grid": "second", "ablation.factors": "model.n_heads", "ablation.base.model.n_heads": "2"}
    parent_id = client.create_run(experiment, run_name="second", tags=tags).info.run_id
    cell = Cell(Config(), {"model.n_heads": "2"}, int(donor.seed), donor.cell_id, "L1-H2-seed0")
    client.set_tag(parent_id, REUSED_TAG + donor.cell_id, reuse_tag_value(donor.run_id, cell))
    history = planted_history(3.5, T, 1e6, np.random.default_rng(1))
    write_run(client, experiment, parent_id, {"model.n_heads": "1"}, int(donor.seed), history)
    grid = analysis.fetch_grid(parent_id, uri)
    assert grid.factors == ["model.n_heads"], "the parent's factors, not the reused run's"
    reused = next(r for r in grid.runs if r.run_id == donor.run_id)
    assert reused.levels == {"model.n_heads": "2"} and reused.reused_from == first_parent
    text, files = report.compare(parent_id, tmp_path, uri, log=False)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Reused runs" in markdown and donor.run_id in markdown
    assert "model.n_layers" not in markdown, "the reused run's own grid does not leak into this report"


def test_fetch_grid_names_an_unknown_run(store):
    with pytest.raises(UserError, match="cannot read run 0123abcd"):
        analysis.fetch_grid("0123abcd", store[0])
    with pytest.raises(UserError, match="malformed"):
        analysis.fetch_grid("x' OR '1'='1", store[0])


def test_a_val_fit_with_too_few_points_after_the_steepest_drop_says_how_many_epochs_would_do():
    grid = fake_grid({"1x": 3.3}, epochs=6, noise=0.0)
    for run in grid.runs:  # a plateau for three epochs, then a power law: three points after the steepest drop
        run.curves.loc[1:3, "val_loss"] = [6.9, 6.85, 6.8]
    result = analysis.analyze(grid)
    assert (result.runs["fit_points"] == 3).all() and (result.runs["fit_from_epoch"] == 4).all()
    warning = next(w for w in report.cautions(result) if w.startswith("convergence fits of val loss"))
    assert "6 of them have under 4 points after their steepest drop: train at least 7 epochs" in warning, warning
