"""Compare the runs of an ablation grid: per-run metrics, per-cell summaries, matched comparisons, the ANOVA.

Everything is read back from MLflow (gpt.ablation.fetch), so a grid trained elsewhere against a
remote tracking server can be compared from anywhere. analyze() turns a GridData into an Analysis
of plain DataFrames: per run (gpt.ablation.metrics), per cell (mean and CI over seeds), and per
factor level against its base level at matched tokens, matched FLOPs and equal epochs
(gpt.ablation.effects), so it is tested on synthetic grids. Losses are cross-entropies in nats;
"CI" is the 95% t-interval over seeds. gpt.ablation.report turns an Analysis into the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from gpt.ablation.effects import adjust, comparisons, grid_anova
from gpt.ablation.fetch import METRICS, GridData, RunData, fetch_grid
from gpt.ablation.metrics import Matching, default_target, run_table
from gpt.ablation.stats import mean_ci

__all__ = ["METRICS", "Analysis", "GridData", "RunData", "analyze", "fetch_grid", "level_order"]


@dataclass
class Analysis:
    grid: GridData
    target_loss: float
    target_source: str
    base_levels: dict[str, str]  # resolved against the levels the runs actually have
    notes: list[str]
    runs: pd.DataFrame  # one row per finished run (gpt.ablation.metrics.run_table)
    summary: pd.DataFrame  # one row per cell: mean and ci95 over seeds
    comparisons: pd.DataFrame  # one row per (factor, level, measure) against the base level (gpt.ablation.effects)
    anova: pd.DataFrame  # the full grid's ANOVA of the headline loss; empty with anova_note saying why
    anova_note: str
    anova_measure: str  # the measure (gpt.ablation.effects.MEASURES key) the ANOVA is of
    matching: Matching
    levels: dict[str, list[str]]  # factor -> its levels in order


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


SUMMARY_METRICS = (
    "val_at_tokens",
    "val_at_flops",
    "val_at_epoch",
    "best_val_loss",
    "best_epoch",
    "final_val_loss",
    "train_val_gap",
    "tokens_to_target",
    "flops_to_target",
    "seconds_to_target",
    "wall_seconds",
    "tokens_per_second",
    "fit_a",
    "fit_c",
    "step_fit_a",
    "step_fit_c",
)


def summary_table(runs: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """One row per cell (a combination of factor levels): mean and ci95 over its seeds."""
    rows = []
    for _, group in _cells(runs, factors):
        row = {f: group[f].iloc[0] for f in factors}
        row.update(cell_id=group["cell_id"].iloc[0], seeds=len(group))
        for column in ("n_params", "non_embedding_params", "flops_per_token", "tokens_per_epoch", "epochs"):
            row[column] = group[column].iloc[0]
        for metric in SUMMARY_METRICS:
            estimate = mean_ci(group[metric])
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = estimate.mean, estimate.ci95
        row["reached_target"] = int(group["tokens_to_target"].notna().sum())
        row["still_improving"] = int(group["still_improving"].fillna(False).sum())
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


def analyze(grid: GridData, target_loss: float | None = None) -> Analysis:
    """All the statistics of a grid. The default target loss is the worst finished run's best val loss,
    the lowest loss every finished run reaches, so tokens and time to target are defined for all of them."""
    if target_loss is None:
        target, source = default_target(grid.runs), "worst run's best val loss"
    else:
        target, source = float(target_loss), "given"
    runs, where = run_table(grid.runs, grid.factors, target)
    levels = {f: level_order(runs[f]) if len(runs) else [] for f in grid.factors}
    base, notes = resolve_base_levels({f: v for f, v in levels.items() if v}, grid.base_levels)
    summary = summary_table(runs, grid.factors) if len(runs) else pd.DataFrame()
    compared = comparisons(runs, grid.factors, base, levels) if len(runs) else pd.DataFrame()
    measure = "tokens" if math.isfinite(where.tokens.value) else "epochs"
    column = {"tokens": "val_at_tokens", "epochs": "val_at_epoch"}[measure]
    table, note = grid_anova(runs, grid.factors, column) if len(runs) else (pd.DataFrame(), "no finished run")
    if len(compared):
        adjust(compared, table)
    return Analysis(grid, target, source, base, notes, runs, summary, compared, table, note, measure, where, levels)
