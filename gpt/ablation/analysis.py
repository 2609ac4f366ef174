"""Compare the runs of an ablation grid: per-run metrics, per-cell summaries, main effects.

Everything is read back from MLflow (the parent run's nested children), so a grid trained elsewhere
against a remote tracking server can be compared from anywhere. fetch_grid() is the only reader;
the tables are built from plain data (dataclasses, DataFrames) with the statistics of
gpt.ablation.stats, so they are tested on synthetic curves. Losses are cross-entropies in nats;
"CI" is the 95% t-interval over seeds.
gpt.ablation.report turns an Analysis into the terminal table and the report files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation.stats import compare_to_base, first_crossing, fit_convergence, mean_ci, overfit_epoch
from gpt.errors import UserError

METRICS = ("val_loss", "train_loss", "tokens_seen", "wall_seconds", "tokens_per_second")


@dataclass
class RunData:
    """One child run: where it sits in the grid and its curves (index: epoch, 1-based; NaN where not logged)."""

    run_id: str
    name: str
    status: str
    cell_id: str
    seed: str
    levels: dict[str, str]  # factor key -> level label, e.g. {"data.stride": "0.5x"}
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(METRICS), dtype=float))
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class GridData:
    parent_run_id: str
    grid_name: str
    factors: list[str]
    base_levels: dict[str, str]  # the parent's ablation.base.<key> tags, as logged
    runs: list[RunData]  # FINISHED children: the only ones that enter the statistics
    others: list[RunData]  # failed, killed or still running children: listed in the report only


@dataclass
class Analysis:
    grid: GridData
    target_loss: float
    target_source: str
    base_levels: dict[str, str]  # resolved against the levels the runs actually have
    notes: list[str]
    runs: pd.DataFrame  # one row per finished run
    summary: pd.DataFrame  # one row per cell: mean and ci95 over seeds
    effects: pd.DataFrame  # one row per factor level


# ---------------------------------------------------------------- reading MLflow


def fetch_grid(parent_run_id: str, tracking_uri: str | None = None) -> GridData:
    """The parent run's nested children with their tags, params and metric histories."""
    if not re.fullmatch(r"[\w-]+", parent_run_id):
        raise UserError(f"run id {parent_run_id!r} is malformed; pass the parent run id shown by the ablation")
    client = MlflowClient(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"cannot read run {parent_run_id} from {client.tracking_uri}: {reason}") from None
    children, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        children.extend(page)
        token = page.token
        if not token:
            break
    if not children:
        raise UserError(f"run {parent_run_id} has no nested child runs; pass the parent run of an ablation grid")

    prefix = "ablation.base."
    base = {k[len(prefix) :]: v for k, v in parent.data.tags.items() if k.startswith(prefix)}
    factors: list[str] = []
    for child in children:
        tags = child.data.tags
        listed = [k for k in tags.get("ablation.factors", "").split(",") if k]
        for key in listed + sorted(k[len("factor.") :] for k in tags if k.startswith("factor.")):
            if key not in factors:
                factors.append(key)
    runs, others = [], []
    for child in children:
        tags, params = child.data.tags, child.data.params
        finished = child.info.status == "FINISHED"
        run = RunData(
            run_id=child.info.run_id,
            name=child.info.run_name or child.info.run_id,
            status=child.info.status,
            cell_id=tags.get("ablation.cell_id", ""),
            seed=tags.get("ablation.seed", params.get("train.seed", "")),
            # a run without a factor's tag ran that factor at the base value
            levels={f: tags.get(f"factor.{f}") or base.get(f) or params.get(f, "") for f in factors},
            params=dict(params),
        )
        if finished:
            run.curves = _curves(client, run.run_id)
        (runs if finished else others).append(run)
    return GridData(parent_run_id, parent.data.tags.get("ablation.grid", ""), factors, base, runs, others)


def _curves(client: MlflowClient, run_id: str) -> pd.DataFrame:
    columns = {}
    for key in METRICS:
        latest: dict[int, float] = {}
        for point in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            latest[point.step] = point.value  # a resumed run may log an epoch again: the last value wins
        columns[key] = pd.Series(latest, dtype=float)
    curves = pd.DataFrame(columns).sort_index()
    curves.index.name = "epoch"
    return curves


# ---------------------------------------------------------------- levels


def level_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, numbers (and ratios like '0.5x') by value first, then the rest alphabetically."""

    def key(label: str) -> tuple[int, float, str]:
        number = _number(label)
        return (0, number, label) if number is not None else (1, 0.0, label)

    return sorted(set(labels), key=key)


def _number(label: str | None) -> float | None:
    match = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*x?\s*", label or "")
    return float(match.group(1)) if match else None


def _same_number(label: str, other: str | None) -> bool:
    """'0.001' is '1e-3', and '0.50x' is '0.5x'; but a ratio '1x' is not the token count '1'."""
    if _number(label) is None or _number(label) != _number(other):
        return False
    return label.strip().endswith("x") == (other or "").strip().endswith("x")


def resolve_base_levels(
    levels: Mapping[str, Sequence[str]], tagged: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Each factor's base level: the parent's tagged base value if it is a level, else the first level."""
    resolved, notes = {}, []
    for factor, options in levels.items():
        tag = tagged.get(factor)
        same = [o for o in options if o == tag or _same_number(o, tag)]
        resolved[factor] = same[0] if same else options[0]
        if not same:
            why = f"base value {tag!r} is not one of its levels" if tag else f"the parent has no ablation.base.{factor}"
            notes.append(f"{factor}: {why}; levels are compared against the first level, {options[0]!r}.")
    return resolved, notes


# ---------------------------------------------------------------- tables


RUN_COLUMNS = (
    "epochs",
    "best_val_loss",
    "best_epoch",
    "final_val_loss",
    "final_train_loss",
    "train_val_gap",
    "tokens_to_target",
    "seconds_to_target",
    "tokens_per_second",
    "overfit_epoch",
    "fit_a",
    "fit_a_se",
    "fit_b",
    "fit_c",
    "fit_c_se",
    "fit_error",
)


def run_metrics(run: RunData, target: float) -> dict[str, float]:
    """Best/final losses, time to target, throughput, overfitting and the convergence fit of one run."""
    curves = run.curves
    val = curves["val_loss"].dropna()
    if val.empty:
        return {**dict.fromkeys(RUN_COLUMNS, math.nan), "epochs": len(curves), "fit_error": "no val_loss logged"}
    at_val = curves.loc[val.index]  # val may be logged every few epochs only
    train = curves["train_loss"].get(val.index[-1], math.nan)
    tps = curves["tokens_per_second"].dropna()
    # the median epoch, because the first epoch also pays for compilation and warm-up
    throughput = float(tps.median()) if len(tps) else float(curves["tokens_seen"].max() / curves["wall_seconds"].max())
    over = overfit_epoch(val.index, val.to_numpy())
    # a curve that turned upward is no power law past its minimum: fit the part that converges
    fitted = at_val if over is None else at_val.loc[:over]
    fit = fit_convergence(fitted["tokens_seen"], fitted["val_loss"])
    return {
        "epochs": int(curves.index.max()),
        "best_val_loss": float(val.min()),
        "best_epoch": int(val.idxmin()),
        "final_val_loss": float(val.iloc[-1]),
        "final_train_loss": float(train),
        "train_val_gap": float(val.iloc[-1] - train),
        "tokens_to_target": first_crossing(at_val["tokens_seen"], val, target),
        "seconds_to_target": first_crossing(at_val["wall_seconds"], val, target),
        "tokens_per_second": throughput,
        "overfit_epoch": math.nan if over is None else over,
        "fit_a": fit.a,
        "fit_a_se": fit.a_se,
        "fit_b": fit.b,
        "fit_c": fit.c,
        "fit_c_se": fit.c_se,
        "fit_error": fit.error,
    }


def run_table(grid: GridData, target: float) -> pd.DataFrame:
    """One row per finished run: its identity, its factor levels and run_metrics()."""
    columns = ["run_id", "run_name", "cell_id", "seed", *grid.factors, *RUN_COLUMNS]
    rows = [
        {
            "run_id": r.run_id,
            "run_name": r.name,
            "cell_id": r.cell_id,
            "seed": r.seed,
            **r.levels,
            **run_metrics(r, target),
        }
        for r in grid.runs
    ]
    return pd.DataFrame(rows, columns=columns)


SUMMARY_METRICS = (
    "best_val_loss",
    "best_epoch",
    "final_val_loss",
    "train_val_gap",
    "tokens_to_target",
    "seconds_to_target",
    "tokens_per_second",
    "fit_a",
    "fit_c",
)


def summary_table(runs: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """One row per cell (a combination of factor levels): mean and ci95 over its seeds."""
    rows = []
    for _, group in _cells(runs, factors):
        row = {f: group[f].iloc[0] for f in factors}
        row.update(cell_id=group["cell_id"].iloc[0], seeds=len(group))
        for metric in SUMMARY_METRICS:
            estimate = mean_ci(group[metric])
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = estimate.mean, estimate.ci95
        row["reached_target"] = int(group["tokens_to_target"].notna().sum())
        row["overfit_runs"] = int(group["overfit_epoch"].notna().sum())
        row["overfit_epoch"] = group["overfit_epoch"].min()
        rows.append(row)
    return pd.DataFrame(rows)


def _cells(runs: pd.DataFrame, factors: Sequence[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(levels, runs) per cell, ordered by level value."""
    if not factors:
        return [((), runs)] if len(runs) else []
    groups = dict(list(runs.groupby(list(factors), sort=False)))
    order = {f: level_order(runs[f]) for f in factors}
    rank = {key: [order[f].index(v) for f, v in zip(factors, key, strict=True)] for key in groups}
    return [(key, groups[key]) for key in sorted(groups, key=rank.__getitem__)]


EFFECT_COLUMNS = (
    "factor",
    "level",
    "base",
    "runs",
    "mean",
    "ci95",
    "delta",
    "delta_ci95",
    "test",
    "matched",
    "p_value",
)


def main_effects(
    runs: pd.DataFrame, factors: Sequence[str], base_levels: Mapping[str, str], metric: str = "best_val_loss"
) -> pd.DataFrame:
    """Per factor level: marginal mean of `metric` with its CI, and the test against the factor's base level.

    Marginal means average over the other-factor combinations in which every level of the factor ran,
    so a one-at-a-time design (or a grid with skipped cells) compares like with like. The test of a
    level uses every combination in which both it and the base level ran, matched by seed.
    """
    rows = []
    for factor in factors:
        others = [f for f in factors if f != factor]
        context = runs[others].astype(str).agg("|".join, axis=1) if others else pd.Series("", index=runs.index)
        levels = level_order(runs[factor])
        complete = [c for c, g in runs.groupby(context) if set(g[factor]) == set(levels)]
        marginal = runs[context.isin(complete)] if complete else runs
        base = base_levels[factor]
        # the matched runs of one level: (other factors' levels, seed) -> metric, repeats averaged
        by_key = runs.assign(_context=context).groupby([factor, "_context", "seed"])[metric].mean().dropna()
        for level in levels:
            estimate = mean_ci(marginal.loc[marginal[factor] == level, metric])
            row = {
                "factor": factor,
                "level": level,
                "base": level == base,
                "runs": estimate.n,
                "mean": estimate.mean,
                "ci95": estimate.ci95,
                "delta": math.nan,
                "delta_ci95": math.nan,
                "test": "base level" if level == base else "",
                "matched": 0,
                "p_value": math.nan,
            }
            if level != base:
                shared = set(context[runs[factor] == level]) & set(context[runs[factor] == base])
                base_runs, level_runs = (
                    {k[1:]: v for k, v in by_key.items() if k[0] == lv and k[1] in shared} for lv in (base, level)
                )
                comparison = compare_to_base(base_runs, level_runs)
                row.update(
                    delta=comparison.delta,
                    delta_ci95=comparison.ci95,
                    test=comparison.test,
                    matched=comparison.n,
                    p_value=comparison.p_value,
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def analyze(grid: GridData, target_loss: float | None = None) -> Analysis:
    """All the statistics of a grid. The default target loss is the worst finished run's best val loss,
    the lowest loss every finished run reaches, so tokens and time to target are defined for all of them."""
    if target_loss is None:
        best = [r.curves["val_loss"].min() for r in grid.runs]
        target, source = max((b for b in best if np.isfinite(b)), default=math.nan), "worst run's best val loss"
    else:
        target, source = float(target_loss), "given"
    runs = run_table(grid, target)
    levels = {f: level_order(runs[f]) if len(runs) else [] for f in grid.factors}
    base, notes = resolve_base_levels({f: v for f, v in levels.items() if v}, grid.base_levels)
    summary = summary_table(runs, grid.factors) if len(runs) else pd.DataFrame()
    effects = main_effects(runs, grid.factors, base) if len(runs) else pd.DataFrame()
    return Analysis(grid, target, source, base, notes, runs, summary, effects)
