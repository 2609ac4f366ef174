"""Per-run numbers of a grid: losses, sizes, compute to a target, matched-compute losses, convergence and fits.

run_table() gives one row per finished run (RUN_COLUMNS after its identity and factor levels). The
losses at matched tokens, FLOPs and epochs need every run's range first (gpt.ablation.matched), so
they are computed for the grid at once. Losses are in nats, tokens are training tokens seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gpt.ablation.fetch import STEP_METRIC, RunData
from gpt.ablation.matched import Budget, common_budget, loss_at
from gpt.ablation.stats import ConvergenceFit, first_crossing, fit_convergence, overfit_epoch, steepest_drop
from gpt.config import ModelConfig
from gpt.sizes import embedding_parameters

# A run whose last evaluation lowered val loss by more than this was still improving when it stopped.
IMPROVING_TOLERANCE = 0.01  # nats
MIN_FIT_POINTS = 4  # a three-parameter fit needs more points than parameters

RUN_COLUMNS = (
    "reused_from",
    "n_params",
    "non_embedding_params",
    "flops_per_token",
    "tokens_per_epoch",
    "epochs",
    "val_points",
    "best_val_loss",
    "best_epoch",
    "final_val_loss",
    "final_train_loss",
    "train_val_gap",
    "last_improvement",
    "still_improving",
    "overfit_epoch",
    "final_tokens",
    "tokens_to_target",
    "flops_to_target",
    "seconds_to_target",
    "wall_seconds",
    "seconds_per_epoch",
    "tokens_per_second",
    "val_at_tokens",
    "val_at_flops",
    "val_at_epoch",
    "concurrent_runs",
    "fit_a",
    "fit_a_se",
    "fit_b",
    "fit_c",
    "fit_c_se",
    "fit_error",
    "fit_points",
    "fit_from_epoch",
    "fit_to_epoch",
    "step_fit_a",
    "step_fit_a_se",
    "step_fit_c",
    "step_fit_c_se",
    "step_fit_error",
)


@dataclass(frozen=True)
class Matching:
    """Where the grid's runs are compared at equal compute (see gpt.ablation.matched)."""

    tokens: Budget
    flops: Budget
    epoch: int  # the last epoch at which every run logged val loss; 0 if there is none


def _param(run: RunData, key: str) -> float:
    try:
        return float(run.params[key])
    except (KeyError, ValueError):
        return math.nan


def _val_points(run: RunData) -> pd.DataFrame:
    """The epochs at which val loss was logged (every train.eval_every epochs), with their other metrics."""
    return run.curves.loc[run.curves["val_loss"].dropna().index]


def _flops(run: RunData, tokens: pd.Series) -> pd.Series:
    return tokens * _param(run, "flops_per_token")


def _step_fit(run: RunData) -> dict[str, float | str]:
    """L(t) = a + b t^-c on the per-step training losses, from the epoch of the steepest drop of the epoch means.

    The first logged step is always left out: it holds the initial transient from the uniform loss.
    """
    steps = run.steps.dropna()
    steps_per_epoch = _param(run, "steps_per_epoch")
    tokens_per_step = _param(run, "tokens_per_epoch") / steps_per_epoch
    if steps.empty:
        fit = ConvergenceFit(math.nan, math.nan, math.nan, math.nan, math.nan, f"no {STEP_METRIC} logged")
    elif not math.isfinite(tokens_per_step):
        fit = ConvergenceFit(math.nan, math.nan, math.nan, math.nan, math.nan, "no steps_per_epoch param")
    else:
        train = run.curves[["tokens_seen", "train_loss"]].dropna()
        start_epoch = int(train.index[steepest_drop(train["tokens_seen"], train["train_loss"])]) if len(train) else 1
        steps = steps.iloc[1:]
        steps = steps[steps.index > (start_epoch - 1) * steps_per_epoch]
        fit = fit_convergence(steps.index.to_numpy(float) * tokens_per_step, steps.to_numpy())
    return {
        "step_fit_a": fit.a,
        "step_fit_a_se": fit.a_se,
        "step_fit_c": fit.c,
        "step_fit_c_se": fit.c_se,
        "step_fit_error": fit.error,
    }


def run_metrics(run: RunData, target: float) -> dict[str, float | str]:
    """The numbers of one run that need no other run (the matched columns are filled by run_table)."""
    curves, at_val = run.curves, _val_points(run)
    val = at_val["val_loss"]
    sizes = {
        "reused_from": run.reused_from,
        "n_params": _param(run, "n_params"),
        "non_embedding_params": non_embedding_from_params(run.params),
        "flops_per_token": _param(run, "flops_per_token"),
        # older runs without the param: tokens seen over epochs trained (equal, as every epoch sees every window)
        "tokens_per_epoch": _param(run, "tokens_per_epoch"),
    }
    if not math.isfinite(sizes["tokens_per_epoch"]) and len(curves):
        sizes["tokens_per_epoch"] = float(curves["tokens_seen"].max() / curves.index.max())
    if val.empty:
        return {**dict.fromkeys(RUN_COLUMNS, math.nan), **sizes, "epochs": len(curves), "fit_error": "no val_loss"}
    train = curves["train_loss"].get(val.index[-1], math.nan)
    tps = curves["tokens_per_second"].dropna()
    wall = float(curves["wall_seconds"].max())
    over = overfit_epoch(val.index, val.to_numpy())
    # a curve that turned upward is no power law past its minimum, nor before its steepest drop: fit between
    fitted = at_val if over is None else at_val.loc[:over]
    fitted = fitted.iloc[steepest_drop(fitted["tokens_seen"], fitted["val_loss"]) :]
    fit = fit_convergence(fitted["tokens_seen"], fitted["val_loss"])
    improvement = float(val.iloc[-2] - val.iloc[-1]) if len(val) > 1 else math.nan
    return {
        **sizes,
        "epochs": int(curves.index.max()),
        "val_points": len(val),
        "best_val_loss": float(val.min()),
        "best_epoch": int(val.idxmin()),
        "final_val_loss": float(val.iloc[-1]),
        "final_train_loss": float(train),
        "train_val_gap": float(val.iloc[-1] - train),
        "last_improvement": improvement,
        "still_improving": bool(improvement > IMPROVING_TOLERANCE),
        "overfit_epoch": math.nan if over is None else over,
        "final_tokens": float(at_val["tokens_seen"].max()),
        "tokens_to_target": first_crossing(at_val["tokens_seen"], val, target),
        "flops_to_target": first_crossing(_flops(run, at_val["tokens_seen"]), val, target),
        "seconds_to_target": first_crossing(at_val["wall_seconds"], val, target),
        "wall_seconds": wall,
        "seconds_per_epoch": wall / int(curves.index.max()),
        # the median epoch, because the first epoch also pays for compilation and warm-up
        "tokens_per_second": float(tps.median()) if len(tps) else float(curves["tokens_seen"].max() / wall),
        "fit_a": fit.a,
        "fit_a_se": fit.a_se,
        "fit_b": fit.b,
        "fit_c": fit.c,
        "fit_c_se": fit.c_se,
        "fit_error": fit.error,
        "fit_points": len(fitted),
        "fit_from_epoch": int(fitted.index[0]) if len(fitted) else math.nan,
        "fit_to_epoch": int(fitted.index[-1]) if len(fitted) else math.nan,
        **_step_fit(run),
    }


def matching(runs: Sequence[RunData]) -> Matching:
    """The grid's matched token and FLOP budgets and its common epoch."""
    points = [_val_points(run) for run in runs]
    tokens = common_budget([p["tokens_seen"].to_numpy(float) for p in points], "tokens")
    flop_points = [_flops(run, p["tokens_seen"]).to_numpy(float) for run, p in zip(runs, points, strict=True)]
    flops = common_budget(flop_points, "FLOPs")
    shared = set.intersection(*(set(p.index) for p in points)) if points else set()
    return Matching(tokens, flops, int(max(shared)) if shared else 0)


def matched_losses(run: RunData, where: Matching) -> dict[str, float]:
    """The run's val loss at the grid's matched token and FLOP budgets and at its common epoch."""
    at_val = _val_points(run)
    tokens = at_val["tokens_seen"]
    return {
        "val_at_tokens": loss_at(tokens, at_val["val_loss"], where.tokens.value),
        "val_at_flops": loss_at(_flops(run, tokens), at_val["val_loss"], where.flops.value),
        "val_at_epoch": float(at_val["val_loss"].get(where.epoch, math.nan)),
    }


def concurrency(runs: Sequence[RunData]) -> dict[str, int]:
    """Run id -> how many other runs overlapped it in time on the same host and device (0: it ran alone)."""
    placed = [
        (r.run_id, r.tags.get("ablation.host", ""), r.params.get("device", ""), r.start_time, r.end_time) for r in runs
    ]
    counts = {}
    for run_id, host, device, start, end in placed:
        counts[run_id] = sum(
            1
            for other, h, d, s, e in placed
            if other != run_id and (h, d) == (host, device) and s < end and start < e  # NaN times never overlap
        )
    return counts


def run_table(runs: Sequence[RunData], factors: Sequence[str], target: float) -> tuple[pd.DataFrame, Matching]:
    """One row per finished run: identity, factor levels, run_metrics() and the matched losses."""
    where = matching(runs)
    overlaps = concurrency(runs)
    rows = [
        {
            "run_id": r.run_id,
            "run_name": r.name,
            "cell_id": r.cell_id,
            "seed": r.seed,
            **r.levels,
            **run_metrics(r, target),
            **matched_losses(r, where),
            "concurrent_runs": overlaps[r.run_id],
        }
        for r in runs
    ]
    columns = ["run_id", "run_name", "cell_id", "seed", *factors, *RUN_COLUMNS]
    frame = pd.DataFrame(rows, columns=columns)
    frame["still_improving"] = frame["still_improving"].astype("boolean") if len(frame) else frame["still_improving"]
    return frame, where


def default_target(runs: Sequence[RunData]) -> float:
    """The worst finished run's best val loss: the lowest loss every run reaches, so compute-to-target is defined."""
    best = [r.curves["val_loss"].min() for r in runs]
    return max((b for b in best if np.isfinite(b)), default=math.nan)


def non_embedding_from_params(params: Mapping[str, str]) -> float:
    """A run's non-embedding parameters (gpt.sizes.non_embedding_parameters; Kaplan et al. 2020, section
    2.1) from its logged params: the logged n_params less the embeddings and head; NaN when one is missing."""
    try:
        lookups = ModelConfig(
            vocab_size=int(params["model.vocab_size"]),
            emb_dim=int(params["model.emb_dim"]),
            context_length=int(params["model.context_length"]),
            tie_weights=params["model.tie_weights"].strip().lower() == "true",
        )
        return float(int(params["n_params"]) - embedding_parameters(lookups))
    except (KeyError, ValueError):
        return math.nan
