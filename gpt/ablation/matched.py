"""Comparing runs at equal compute: each run's val loss at a token (or FLOP) budget that every run reaches.

A smaller stride or a longer context sees more tokens per epoch, so at equal epochs it has simply
trained more; compared at the same number of training tokens (or FLOPs, when the model size
differs) the difference is what the setting does per unit of compute. Val loss is logged once per
evaluation, so a run's loss at a budget between two evaluations is interpolated linearly in
log(tokens), the axis on which loss curves are close to straight (Kaplan et al. 2020, fig. 2);
a budget outside a run's logged range is never extrapolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    """The largest budget every run reaches, or why there is none (value NaN)."""

    value: float  # tokens or FLOPs; NaN when the runs' logged ranges do not overlap
    earliest: float  # the latest first evaluation of any run: budgets below it would be extrapolated
    reason: str = ""


def common_budget(x_per_run: Sequence[Sequence[float]], unit: str = "tokens") -> Budget:
    """The largest x at which every run has logged val loss on both sides (its last x, for the shortest run).

    x_per_run holds each run's x (tokens seen, FLOPs) at its val-loss points.
    """
    ranges = [(float(np.nanmin(x)), float(np.nanmax(x))) for x in x_per_run if np.isfinite(np.asarray(x, float)).any()]
    if not ranges:
        return Budget(math.nan, math.nan, "no run logged val loss")
    earliest = max(low for low, _ in ranges)
    budget = min(high for _, high in ranges)
    if budget < earliest:
        reason = (
            f"no {unit} budget lies inside every run's logged range: one run's first evaluation comes after "
            f"{earliest:.3g} {unit}, another run ends at {budget:.3g}"
        )
        return Budget(math.nan, earliest, reason)
    return Budget(budget, earliest)


def loss_at(x: Sequence[float], loss: Sequence[float], budget: float) -> float:
    """The loss at `budget`, interpolated linearly in log(x) between the logged points around it; NaN outside them."""
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if not len(x) or not np.isfinite(budget) or budget <= 0:
        return math.nan
    order = np.argsort(x)
    x, y = x[order], y[order]
    if budget < x[0] * (1 - 1e-9) or budget > x[-1] * (1 + 1e-9):
        return math.nan
    return float(np.interp(math.log(budget), np.log(x), y))


def epochs_to_overlap(first_tokens: Sequence[float], tokens_per_epoch: Sequence[float]) -> int:
    """Epochs after which the run with the fewest tokens per epoch has passed every run's first evaluation.

    That many epochs (plus one, to have a range) make a matched-token comparison possible.
    """
    return math.ceil(max(first_tokens) / min(tokens_per_epoch)) + 1
