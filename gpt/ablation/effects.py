"""The effect of each factor level against its base level, at matched compute, with CIs and tests; the grid's ANOVA.

A comparison pairs each run of a level with the base-level run that has the same other-factor
levels and seed (a paired t-test on the differences, which removes what a seed and the other
factors contribute), and falls back to Welch's t-test where runs cannot be paired. It uses only
the other-factor combinations in which both levels ran, so a one-at-a-time design compares each
level with the base cell. Losses are compared as differences in nats; compute (tokens, FLOPs,
seconds) as ratios, tested and averaged on the log scale (a geometric mean ratio).

The p-values of every comparison and ANOVA term of a report form one family, adjusted with Holm's
method; wall-time comparisons are machine-dependent and left out of the family (no test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpt.ablation.stats import anova, compare_to_base, holm


@dataclass(frozen=True)
class Measure:
    key: str
    column: str  # the run table's column
    label: str  # how the report names it
    ratio: bool  # compared as a ratio (compute) rather than a difference (loss)
    tested: bool = True  # wall time: machine-dependent, an interval but no test
    needs_flops: bool = False  # only for factors whose levels differ in FLOPs per token


MEASURES = (
    Measure("tokens", "val_at_tokens", "val loss at matched tokens", ratio=False),
    Measure("flops", "val_at_flops", "val loss at matched FLOPs", ratio=False, needs_flops=True),
    Measure("epochs", "val_at_epoch", "val loss at equal epochs", ratio=False),
    Measure("tokens_to_target", "tokens_to_target", "tokens to target", ratio=True),
    Measure("flops_to_target", "flops_to_target", "FLOPs to target", ratio=True, needs_flops=True),
    Measure("wall", "seconds_per_epoch", "wall time per epoch (machine-dependent)", ratio=True, tested=False),
)
MEASURE_BY_KEY = {m.key: m for m in MEASURES}

COMPARISON_COLUMNS = (
    "factor",
    "level",
    "base",
    "measure",
    "estimate",  # loss: level - base (nats); compute: level / base
    "low",  # the 95% CI of the estimate
    "high",
    "test",
    "n",
    "p_value",
    "p_holm",
)


def _context(runs: pd.DataFrame, factor: str, factors: Sequence[str]) -> pd.Series:
    others = [f for f in factors if f != factor]
    return runs[others].astype(str).agg("|".join, axis=1) if others else pd.Series("", index=runs.index)


def level_ratio(runs: pd.DataFrame, factors: Sequence[str], factor: str, level: str, base: str, column: str) -> float:
    """`column` (tokens per epoch, parameters...) at `level` over its value at `base`, other factors equal.

    The geometric mean over the other-factor combinations in which both levels ran, so an uneven
    mix of the other factors' levels (a grid still running) does not show up as an effect. NaN if none.
    """
    context = _context(runs, factor, factors)
    medians = runs.assign(_context=context).groupby(["_context", factor])[column].median()
    ratios = [
        medians[(key, level)] / medians[(key, base)]
        for key in set(context)
        if (key, level) in medians.index and (key, base) in medians.index and medians[(key, base)] > 0
    ]
    finite = [r for r in ratios if np.isfinite(r) and r > 0]
    return float(np.exp(np.mean(np.log(finite)))) if finite else math.nan


def differs_in_flops(runs: pd.DataFrame, factors: Sequence[str], factor: str, levels: Sequence[str], base: str) -> bool:
    """Whether the factor's levels train models of different FLOPs per token (depth, width, context)."""
    ratios = [level_ratio(runs, factors, factor, level, base, "flops_per_token") for level in levels if level != base]
    return any(np.isfinite(r) and abs(r - 1) > 1e-9 for r in ratios)


def _compare(runs: pd.DataFrame, factor: str, context: pd.Series, base: str, level: str, measure: Measure) -> dict:
    values = runs[measure.column].astype(float)
    if measure.ratio:
        values = np.log(values.where(values > 0))
    keyed = runs.assign(_value=values, _context=context).groupby([factor, "_context", "seed"])["_value"].mean()
    keyed = keyed.dropna()
    shared = set(context[runs[factor] == level]) & set(context[runs[factor] == base])
    base_runs, level_runs = (
        {key[1:]: value for key, value in keyed.items() if key[0] == lv and key[1] in shared} for lv in (base, level)
    )
    result = compare_to_base(base_runs, level_runs)
    low, high = result.low, result.high
    estimate = result.delta
    if measure.ratio:
        estimate, low, high = (math.exp(v) if math.isfinite(v) else math.nan for v in (estimate, low, high))
    tested = measure.tested and math.isfinite(result.p_value)
    return {
        "factor": factor,
        "level": level,
        "base": base,
        "measure": measure.key,
        "estimate": estimate,
        "low": low,
        "high": high,
        "test": result.test if measure.tested else "no test (machine-dependent)",
        "n": result.n,
        "p_value": result.p_value if tested else math.nan,
        "p_holm": math.nan,
    }


def comparisons(
    runs: pd.DataFrame, factors: Sequence[str], base_levels: Mapping[str, str], levels: Mapping[str, list[str]]
) -> pd.DataFrame:
    """One row per (factor, non-base level, measure): the estimate against the base level, its CI and test."""
    rows = []
    for factor in factors:
        context = _context(runs, factor, factors)
        flops = differs_in_flops(runs, factors, factor, levels[factor], base_levels[factor])
        for level in levels[factor]:
            if level == base_levels[factor]:
                continue
            for measure in MEASURES:
                if measure.needs_flops and not flops:
                    continue
                rows.append(_compare(runs, factor, context, base_levels[factor], level, measure))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def is_full_grid(runs: pd.DataFrame, factors: Sequence[str]) -> bool:
    """Every combination of the factors' levels has a run: the cells of a cartesian grid."""
    if not factors or runs.empty:
        return False
    expected = math.prod(runs[f].nunique() for f in factors)
    return len(runs[list(factors)].drop_duplicates()) == expected


def grid_anova(runs: pd.DataFrame, factors: Sequence[str], column: str) -> tuple[pd.DataFrame, str]:
    """gpt.ablation.stats.anova on a full grid's runs, or an empty table and why there is none."""
    if not is_full_grid(runs, factors):
        return pd.DataFrame(), "the grid is not a full cartesian grid (one-at-a-time designs compare against the base)"
    varied = [f for f in factors if runs[f].nunique() > 1]
    table, reason = anova(runs, varied, column)
    if reason:
        return table, reason
    table["p_holm"] = math.nan
    return table, ""


def adjust(comparison: pd.DataFrame, anova_table: pd.DataFrame) -> None:
    """Holm-adjust the p-values of both tables as one family, in place (column p_holm)."""
    p = [*comparison["p_value"].tolist(), *(anova_table["p_value"].tolist() if len(anova_table) else [])]
    adjusted = holm(p)
    comparison["p_holm"] = adjusted[: len(comparison)]
    if len(anova_table):
        anova_table["p_holm"] = adjusted[len(comparison) :]
