"""The warnings a report puts before its tables: what limits the conclusions a user may draw from the grid."""

from __future__ import annotations

import math

import pandas as pd

from gpt.ablation.analysis import Analysis
from gpt.ablation.matched import epochs_to_overlap
from gpt.ablation.metrics import IMPROVING_TOLERANCE, MIN_FIT_POINTS


def _convergence(analysis: Analysis) -> list[str]:
    runs = analysis.runs
    improving = int(runs["still_improving"].fillna(False).sum())
    lines = []
    if improving:
        epochs = int(runs["epochs"].max())
        lines.append(
            f"not converged: {improving} of {len(runs)} runs were still improving at their last epoch (val loss "
            f"fell by more than {IMPROVING_TOLERANCE} nats); the effects describe training up to {epochs} epochs, "
            f"not where the runs end up (train longer, e.g. --set train.epochs={2 * epochs}, to see)"
        )
    return lines


def _fits(analysis: Analysis) -> list[str]:
    runs = analysis.runs
    points = int(runs["val_points"].fillna(0).min())
    if points < MIN_FIT_POINTS:
        every = max(1, round(float(runs["epochs"].max()) / max(points, 1)))
        return [
            f"convergence fits impossible: the runs have {points} validation points and L(t) = a + b·t^−c needs at "
            f"least {MIN_FIT_POINTS}; train at least {MIN_FIT_POINTS * every} epochs (--set "
            f"train.epochs={MIN_FIT_POINTS * every})"
        ]
    lines = []
    for column, what in (("fit_error", "val loss per epoch"), ("step_fit_error", "train loss per step")):
        failed = runs[runs[column].fillna("").astype(str) != ""]
        if len(failed):
            reason = failed[column].mode().iloc[0]
            lines.append(
                f"convergence fits of {what} are no result for {len(failed)} of {len(runs)} runs (most often: "
                f"{reason}); their parameters are not reported{_more_epochs(failed) if column == 'fit_error' else ''}"
            )
    return lines


def _more_epochs(failed: pd.DataFrame) -> str:
    """How many epochs would give the val fits of short runs (not of overfitting ones) their points."""
    short = failed[(failed["fit_points"] < MIN_FIT_POINTS) & failed["overfit_epoch"].isna()]
    if not len(short):
        return ""
    epochs = int((short["epochs"] + MIN_FIT_POINTS - short["fit_points"]).max())
    return (
        f"; {len(short)} of them have under {MIN_FIT_POINTS} points after their steepest drop: train at least "
        f"{epochs} epochs (--set train.epochs={epochs})"
    )


def _matching(analysis: Analysis) -> list[str]:
    where = analysis.matching
    if math.isfinite(where.tokens.value):
        return []
    runs = analysis.runs
    first = (runs["final_tokens"] / runs["val_points"]).tolist()  # tokens at each run's first evaluation
    needed = epochs_to_overlap(first, runs["tokens_per_epoch"].tolist()) if len(runs) else 0
    return [
        f"no comparison at matched tokens: {where.tokens.reason}; effects are shown at equal epochs only, which "
        f"favour settings that see more tokens per epoch. Train at least {needed} epochs to compare per token"
    ]


def _wall_time(analysis: Analysis) -> list[str]:
    runs = analysis.runs
    shared = runs[runs["concurrent_runs"] > 0]
    if not len(shared):
        return []
    return [
        f"wall times are machine-dependent, and {len(shared)} of {len(runs)} runs ran while other runs of the grid "
        f"shared their host and device (up to {int(runs['concurrent_runs'].max()) + 1} at once): their times "
        "include that contention; compare tokens or FLOPs instead"
    ]


def cautions(analysis: Analysis) -> list[str]:
    """Every warning for the grid, most consequential first."""
    grid, runs = analysis.grid, analysis.runs
    if not len(runs):
        return ["no finished run: nothing to compare"]
    lines = [*_matching(analysis), *_convergence(analysis), *_fits(analysis), *_wall_time(analysis)]
    single = analysis.summary[analysis.summary["seeds"] < 2]
    if len(single):
        lines.append(
            f"{len(single)} cell(s) have a single seed: a cell has no spread of its own; a comparison's CI and test "
            "pair runs across the other factors' levels, which then serve as replicates and assume no interaction; "
            "run more seeds (--seeds 0,1,2) to measure it"
        )
    overfit = int(runs["overfit_epoch"].notna().sum())
    if overfit:
        lines.append(f"overfitting: val loss rose again after its minimum in {overfit} of {len(runs)} runs")
    reused = runs[runs["reused_from"].fillna("") != ""]
    if len(reused):
        lines.append(f"{len(reused)} cell(s) reuse finished runs of another grid with the same cell id (listed below)")
    if grid.others:
        lines.append(f"{len(grid.others)} run(s) did not finish and are left out (listed below)")
    return lines + list(analysis.notes)
