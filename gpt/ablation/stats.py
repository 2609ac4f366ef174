"""Statistics of an ablation on plain numbers: t-intervals, t-tests, ANOVA, Holm, curve crossings, power-law fits.

Pure functions of sequences, mappings and DataFrames that know nothing of MLflow, runs or grids, so
they are tested on synthetic data with known answers; gpt.ablation.analysis applies them to the runs
of a grid. The tests and intervals are scipy's, the ANOVA and the Holm adjustment statsmodels'.
Losses are cross-entropies in nats; "CI" is the 95% Student-t interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
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

    @property
    def low(self) -> float:
        return self.delta - self.ci95

    @property
    def high(self) -> float:
        return self.delta + self.ci95


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


def steepest_drop(x: Sequence[float], loss: Sequence[float]) -> int:
    """Where a power-law fit of a loss curve starts: 0, or the first point after a later steepest fall per log(x).

    L(t) = a + b t^-c falls ever more slowly per log t (its slope is -c b t^-c), so on a power law
    the steepest fall is the first and the fit takes every point. Small models often sit on a
    plateau (the unigram loss) and then learn faster for a while: that part is no power law, and
    the fit starts after the steepest fall, where the curve decelerates (0 for fewer than 2 points).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if len(x) < 2:
        return 0
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = -np.diff(y) / np.diff(np.log(x))
    steepest = int(np.argmax(np.where(np.isfinite(slope), slope, -np.inf)))
    return 0 if steepest == 0 else steepest + 1


def _power_law(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a + b * s ** (-c)


def _power_law_jacobian(s: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    decay = s ** (-c)
    return np.column_stack([np.ones_like(s), decay, -b * decay * np.log(s)])


def fit_convergence(tokens: Sequence[float], loss: Sequence[float]) -> ConvergenceFit:
    """Least-squares fit of L(t) = a + b * t^(-c) (the data-limited form of Kaplan et al. 2020, eq. 1.2).

    A fit that failed or is not identified (see _unidentified) is reported in `error` with NaN
    parameters, never raised: only an identified fit is a result.
    """
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
    bounds = ([0.0, 0.0, C_BOUNDS[0]], [high, np.inf, C_BOUNDS[1]])
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
    problem = _unidentified(a, b, c, se, high, high - low)
    if problem:
        return ConvergenceFit(**failed, error=problem)
    return ConvergenceFit(float(a), float(b * t[0] ** c), float(c), float(se[0]), float(se[2]))


C_BOUNDS = (1e-3, 10.0)  # the rate c is searched in this range
_AT_BOUND = 1e-3  # relative distance from a bound within which an estimate sits on it


def _unidentified(a: float, b: float, c: float, se: np.ndarray, highest: float, span: float) -> str:
    """Why a least-squares power-law fit is no result ('' if it is one).

    An estimate that sits on a bound of the search (the asymptote at 0 or at the highest loss, the
    rate at either end of C_BOUNDS, no decay at all) is where the optimizer was stopped, not a minimum; and where
    the standard errors are undefined or as large as the estimates, the data do not determine the
    parameters (too few points, or a curve that has not bent yet).
    """
    if a <= _AT_BOUND * highest:
        return "not identified: the asymptote a sits on its bound 0 (the curve has not flattened yet)"
    if a >= highest * (1 - _AT_BOUND):
        return "not identified: the asymptote a sits at the highest loss (no decay to fit)"
    if b <= _AT_BOUND * span:
        return "not identified: the amplitude b sits on its bound 0 (the loss does not decay)"
    if c <= C_BOUNDS[0] * (1 + 10 * _AT_BOUND) or c >= C_BOUNDS[1] * (1 - _AT_BOUND):
        return f"not identified: the rate c sits on its bound {C_BOUNDS[0] if c < 1 else C_BOUNDS[1]:g}"
    if not np.all(np.isfinite(se)):
        return "not identified: the fit's covariance is singular (standard errors undefined)"
    if se[0] >= span or se[2] >= c:
        estimates = f"a = {a:.3g} ± {se[0]:.2g}, c = {c:.3g} ± {se[2]:.2g}"
        return f"not identified: {estimates} (standard errors as large as the estimates)"
    return ""


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


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (statsmodels' multipletests); NaN entries stay NaN.

    Controls the family-wise error rate at any dependence between the tests (Holm 1979).
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method="holm")[1]
    return adjusted


ANOVA_COLUMNS = ("term", "df", "sum_sq", "F", "p_value", "partial_eta_sq")


def anova(frame: pd.DataFrame, factors: Sequence[str], response: str) -> tuple[pd.DataFrame, str]:
    """ANOVA of `response` on the factors: main effects and every two-way interaction, type II sums of squares.

    statsmodels' ols + anova_lm(typ=2); the replicates (seeds) of a cell are the error term. Partial
    eta squared = SS_term / (SS_term + SS_residual) (Cohen 1973). Rows with a NaN response are left
    out. Returns the table (ANOVA_COLUMNS; the interaction of a and b is the term 'a × b', the error
    'residual') and '' - or an empty table and why there is no ANOVA (a factor with one level, no
    replicate to estimate the error).
    """
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = frame[[*factors, response]].dropna()
    names = {f"f{i}": key for i, key in enumerate(factors)}
    single = [key for key in factors if data[key].nunique() < 2]
    if not factors or single or data.empty:
        return pd.DataFrame(columns=ANOVA_COLUMNS), f"{', '.join(single) or 'no factor'} has fewer than 2 levels"
    renamed = pd.DataFrame({code: data[key].astype(str).to_numpy() for code, key in names.items()})
    renamed["y"] = data[response].to_numpy(dtype=float)
    terms = " + ".join(f"C({code})" for code in names)
    fit = ols(f"y ~ ({terms})**2" if len(names) > 1 else f"y ~ {terms}", data=renamed).fit()
    if fit.df_resid < 1:
        return pd.DataFrame(columns=ANOVA_COLUMNS), "no replicate seeds to estimate the error"
    table = anova_lm(fit, typ=2)
    residual = float(table.loc["Residual", "sum_sq"])
    rows = []
    for term, row in table.iterrows():
        label = " × ".join(names[code[2:-1]] for code in str(term).split(":")) if term != "Residual" else "residual"
        effect = term != "Residual"
        rows.append(
            {
                "term": label,
                "df": float(row["df"]),
                "sum_sq": float(row["sum_sq"]),
                "F": float(row["F"]) if effect else math.nan,
                "p_value": float(row["PR(>F)"]) if effect else math.nan,
                "partial_eta_sq": float(row["sum_sq"]) / (float(row["sum_sq"]) + residual) if effect else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=ANOVA_COLUMNS), ""
