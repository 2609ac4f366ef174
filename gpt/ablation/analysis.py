"""Compare the runs of an ablation grid: summary statistics, main effects, convergence fits.

Everything is read back from MLflow (the parent run's nested children), so a grid trained elsewhere
against a remote tracking server can be compared from anywhere. fetch_grid() is the only reader;
the statistics are pure functions on plain data (dataclasses, DataFrames), so they are tested on
synthetic curves. Losses are cross-entropies in nats; "CI" is the 95% t-interval over seeds.
gpt.ablation.report turns an Analysis into the terminal table and the report files.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import optimize, stats

from gpt.errors import UserError

METRICS = ("val_loss", "train_loss", "tokens_seen", "wall_seconds", "tokens_per_second")
CONFIDENCE = 0.95
# Val loss must climb this many nats above its minimum to count as overfitting: smaller wiggles are
# the noise of a validation pass, not a trend.
OVERFIT_TOLERANCE = 0.01


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


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci95: float  # half-width of the t-interval; NaN with fewer than two values
    n: int


@dataclass(frozen=True)
class ConvergenceFit:
    """L(t) = a + b * t^(-c) over tokens seen t; standard errors from the fit's covariance."""

    a: float
    b: float
    c: float
    a_se: float
    c_se: float
    error: str = ""  # why the fit failed; empty when it succeeded


@dataclass(frozen=True)
class Comparison:
    delta: float  # mean(level) - mean(base)
    ci95: float  # half-width of the interval of delta
    p_value: float
    test: str  # "paired t", "Welch t" or why there is no test
    n: int  # pairs (paired) or runs of the level (Welch)


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


# ---------------------------------------------------------------- statistics on plain data


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and half-width of the Student-t confidence interval; non-finite values are ignored."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return Estimate(math.nan, math.nan, 0)
    if len(x) == 1:
        return Estimate(float(x[0]), math.nan, 1)
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return Estimate(float(x.mean()), float(half), len(x))


def first_crossing(x: Sequence[float], loss: Sequence[float], target: float) -> float:
    """The x (tokens seen, seconds) at which `loss` first falls to `target`, or NaN if it never does.

    Linearly interpolated between the last logged point above the target and the first at or below
    it. Nothing is logged before epoch 1, so a curve already at the target there returns its first x.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    below = np.flatnonzero(y <= target)
    if not below.size:
        return math.nan
    i = below[0]
    if i == 0:
        return float(x[0])
    return float(x[i - 1] + (y[i - 1] - target) / (y[i - 1] - y[i]) * (x[i] - x[i - 1]))


def overfit_epoch(epochs: Sequence[int], val_loss: Sequence[float], tolerance: float = OVERFIT_TOLERANCE) -> int | None:
    """The epoch of the lowest val loss when the loss later rises more than `tolerance` above it, else None."""
    e, y = np.asarray(epochs), np.asarray(val_loss, dtype=float)
    keep = np.isfinite(y)
    e, y = e[keep], y[keep]
    if not len(y):
        return None
    best = int(np.argmin(y))
    return int(e[best]) if np.any(y[best + 1 :] > y[best] + tolerance) else None


def _power_law(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a + b * s ** (-c)


def _power_law_jacobian(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    decay = s ** (-c)
    return np.column_stack([np.ones_like(s), decay, -b * decay * np.log(s)])


def fit_convergence(tokens: Sequence[float], loss: Sequence[float]) -> ConvergenceFit:
    """Least-squares fit of L(t) = a + b * t^(-c); a failed fit is reported in `error`, never raised."""
    t, y = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[keep], y[keep]
    order = np.argsort(t)
    t, y = t[order], y[order]
    failed = dict(a=math.nan, b=math.nan, c=math.nan, a_se=math.nan, c_se=math.nan)
    if len(t) < 4:
        return ConvergenceFit(**failed, error=f"fit failed: {len(t)} points, needs at least 4")
    if np.ptp(y) <= 0:
        return ConvergenceFit(**failed, error="fit failed: flat curve")
    # Fitting in units of the first point's tokens keeps b near the loss range whatever the token scale.
    s = t / t[0]
    low, high = float(y.min()), float(y.max())
    bounds = ([0.0, 0.0, 1e-3], [high, np.inf, 10.0])
    a0 = max(0.0, low - 0.1 * (high - low))  # the asymptote lies below the lowest point
    best = None
    for c0 in (0.2, 0.5, 1.0, 2.0):  # a few starting rates: one of them lands in the right basin
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", optimize.OptimizeWarning)
                params, cov = optimize.curve_fit(
                    _power_law,
                    s,
                    y,
                    p0=(a0, max(y[0] - a0, 1e-6), c0),
                    jac=_power_law_jacobian,
                    bounds=bounds,
                    maxfev=10_000,
                )
        except (RuntimeError, ValueError, optimize.OptimizeWarning):
            continue
        sse = float(np.sum((_power_law(s, *params) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, params, cov)
    if best is None:
        return ConvergenceFit(**failed, error="fit failed: least squares did not converge")
    _, (a, b, c), cov = best
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.diag(cov))
    return ConvergenceFit(float(a), float(b * t[0] ** c), float(c), float(se[0]), float(se[2]))


def compare_to_base(base: Mapping[Hashable, float], level: Mapping[Hashable, float]) -> Comparison:
    """Test a level against the base level; keys name the matched run (other factors' levels, seed).

    With the same keys on both sides the runs are paired (a paired t-test on the differences, which
    removes what a seed and the other factors contribute); otherwise Welch's t-test, which does not
    assume equal variances.
    """
    if not base or not level:
        return Comparison(math.nan, math.nan, math.nan, "no matched runs", 0)
    delta = float(np.mean(list(level.values())) - np.mean(list(base.values())))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance: scipy warns and returns NaN
        if set(base) == set(level) and len(base) >= 2:
            keys = list(base)
            result = stats.ttest_rel([level[k] for k in keys], [base[k] for k in keys])
            test, n = "paired t", len(keys)
        elif len(base) >= 2 and len(level) >= 2:
            result = stats.ttest_ind(list(level.values()), list(base.values()), equal_var=False)
            test, n = "Welch t", len(level)
        else:
            return Comparison(delta, math.nan, math.nan, "too few runs", len(level))
        interval = result.confidence_interval(CONFIDENCE)
    return Comparison(delta, float(interval.high - interval.low) / 2, float(result.pvalue), test, n)


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
