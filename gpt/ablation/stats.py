"""Statistics of an ablation on plain numbers: t-intervals, t-tests, curve crossings, power-law fits.

Pure functions of sequences and mappings that know nothing of MLflow, runs or grids, so they are
tested on synthetic data with known answers; gpt.ablation.analysis applies them to the runs of a grid.
Losses are cross-entropies in nats; "CI" is the 95% Student-t interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
# Val loss must climb this many nats above its minimum to count as overfitting: smaller wiggles are
# the noise of a validation pass, not a trend.
OVERFIT_TOLERANCE = 0.01


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
