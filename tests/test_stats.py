"""Ablation statistics on synthetic data with known answers: fits, intervals, tests, ANOVA and Holm, matched compute."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from gpt.ablation import matched, stats

# 40 epochs of 100k tokens on the curve L(t) = 3 + 950 * t^-0.5: the fit must find a=3, b=950, c=0.5
TOKENS = np.arange(1, 41) * 100_000
LOSS = 3.0 + 950.0 * TOKENS**-0.5


# ---------------------------------------------------------------- convergence fit


def test_fit_recovers_known_parameters_from_a_noiseless_curve():
    fit = stats.fit_convergence(TOKENS, LOSS)
    assert fit.error == ""
    assert fit.a == pytest.approx(3.0, abs=1e-3), fit
    assert fit.b == pytest.approx(950.0, rel=1e-2), fit
    assert fit.c == pytest.approx(0.5, abs=1e-3), fit


def test_fit_recovers_parameters_from_a_mildly_noisy_curve_within_its_standard_errors():
    loss = LOSS + np.random.default_rng(1).normal(0, 0.005, len(TOKENS))
    fit = stats.fit_convergence(TOKENS, loss)
    assert fit.error == ""
    assert abs(fit.a - 3.0) < max(0.1, 3 * fit.a_se), f"asymptote {fit.a} ± {fit.a_se}, expected 3.0"
    assert abs(fit.c - 0.5) < max(0.1, 3 * fit.c_se), f"rate {fit.c} ± {fit.c_se}, expected 0.5"
    assert 0 < fit.a_se < 0.2 and 0 < fit.c_se < 0.2


@pytest.mark.parametrize(
    "tokens, loss, reason",
    [
        ([1e5, 2e5, 3e5], [5.0, 4.0, 3.5], "needs at least 4"),
        ([1e5, 2e5, 3e5, 4e5], [4.0, 4.0, 4.0, 4.0], "flat curve"),
        ([1e5, 2e5, np.nan, 4e5], [5.0, np.nan, 4.0, 3.9], "needs at least 4"),
    ],
)
def test_fit_reports_failure_instead_of_raising(tokens, loss, reason):
    fit = stats.fit_convergence(tokens, loss)
    assert reason in fit.error and math.isnan(fit.a)


# ---------------------------------------------------------------- intervals and tests


def test_confidence_interval_is_the_student_t_interval():
    estimate = stats.mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, df=2) = 4.3027
    assert estimate.mean == pytest.approx(2.0)
    assert estimate.ci95 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert math.isnan(stats.mean_ci([1.0]).ci95) and stats.mean_ci([np.nan, 2.0]).n == 1


def test_confidence_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    samples = rng.normal(4.0, 0.05, size=(1000, 3))
    covered = [abs(e.mean - 4.0) <= e.ci95 for e in map(stats.mean_ci, samples)]
    assert 0.925 < np.mean(covered) < 0.975, f"coverage {np.mean(covered):.3f}, expected about 0.95"


def test_a_real_difference_between_levels_is_significant():
    rng = np.random.default_rng(3)
    base = {("", seed): 3.3 + rng.normal(0, 0.02) for seed in "012"}
    level = {("", seed): 3.0 + rng.normal(0, 0.02) for seed in "012"}
    comparison = stats.compare_to_base(base, level)
    assert comparison.test == "paired t" and comparison.n == 3
    assert comparison.p_value < 0.05, comparison
    assert comparison.delta == pytest.approx(-0.3, abs=0.05)
    assert abs(comparison.delta + 0.3) <= comparison.ci95 + 0.05


def test_pure_noise_is_rarely_significant():
    rng = np.random.default_rng(4)
    p_values = [
        stats.compare_to_base(
            dict(enumerate(rng.normal(3.0, 0.02, 3))), dict(enumerate(rng.normal(3.0, 0.02, 3)))
        ).p_value
        for _ in range(400)
    ]
    assert np.mean(np.array(p_values) < 0.05) < 0.09, "the test rejects noise more often than its 5% level"


def test_unmatched_seeds_use_welch_and_single_runs_get_no_test():
    welch = stats.compare_to_base({0: 3.3, 1: 3.31, 2: 3.29}, {3: 3.0, 4: 3.02})
    assert welch.test == "Welch t" and welch.p_value < 0.05
    assert stats.compare_to_base({0: 3.3}, {0: 3.0}).test == "too few runs"


# ---------------------------------------------------------------- curves


def test_overfitting_is_flagged_at_the_epoch_of_lowest_val_loss():
    val = [5.0, 4.2, 3.8, 3.6, 3.65, 3.8, 4.0]
    assert stats.overfit_epoch(range(1, 8), val) == 4
    assert stats.overfit_epoch(range(1, 8), [5.0, 4.0, 3.5, 3.2, 3.1, 3.05, 3.0]) is None
    assert stats.overfit_epoch(range(1, 5), [5.0, 4.0, 3.5, 3.505]) is None, "a rise within tolerance is noise"
    assert stats.overfit_epoch([2, 4, 6, 8], [5.0, 4.0, 4.5, 4.6]) == 4, "epochs come from the index, not positions"


def test_tokens_to_target_interpolates_the_first_crossing():
    tokens = [100, 200, 300, 400, 500]
    loss = [5.0, 4.0, 3.0, 3.6, 2.5]
    assert stats.first_crossing(tokens, loss, 3.5) == pytest.approx(250.0), "halfway between 4.0 and 3.0"
    assert stats.first_crossing(tokens, loss, 3.0) == pytest.approx(300.0)
    assert stats.first_crossing(tokens, loss, 6.0) == 100.0, "already below at the first logged epoch"
    assert stats.first_crossing(tokens, loss, 2.7) == pytest.approx(500 - 100 * 0.2 / 1.1)
    assert math.isnan(stats.first_crossing(tokens, loss, 2.0))


def test_a_curve_that_has_not_bent_is_not_identified_and_gives_no_parameters():
    # a straight line in log tokens over one decade: any asymptote below it fits, so the fit is no result
    tokens = np.geomspace(1e5, 1e6, 10)
    loss = 6.0 - 0.3 * np.log(tokens / 1e5) + np.random.default_rng(7).normal(0, 0.002, 10)
    fit = stats.fit_convergence(tokens, loss)
    assert fit.error.startswith("not identified"), fit
    assert math.isnan(fit.a) and math.isnan(fit.c) and math.isnan(fit.a_se)


def test_a_fit_on_a_bound_is_not_reported():
    # loss rising with tokens: the best decaying curve is flat, b = 0 on its bound
    fit = stats.fit_convergence(TOKENS[:8], 3.0 + 0.01 * np.arange(8))
    assert fit.error.startswith("not identified") and "bound" in fit.error, fit
    assert math.isnan(fit.a)


def test_a_fit_starts_at_the_steepest_drop_which_is_the_start_of_a_power_law():
    assert stats.steepest_drop(TOKENS, LOSS) == 0, "a power law falls fastest per log token at its start"
    # a plateau at the unigram loss, then faster learning, then a power law: the fit must start at the drop
    plateau = [6.70, 6.60, 6.50, 6.30, *(3.0 + 950.0 * TOKENS[4:] ** -0.5)]
    start = stats.steepest_drop(TOKENS, plateau)
    assert start == 4, "the first point after the fall from the plateau"
    fit = stats.fit_convergence(TOKENS[start:], plateau[start:])
    assert fit.a == pytest.approx(3.0, abs=1e-3)


# ---------------------------------------------------------------- multiple tests and ANOVA, against the libraries


def test_holm_matches_statsmodels_and_the_step_down_rule():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.5])
    adjusted = stats.holm(p)
    finite = np.isfinite(p)
    assert np.allclose(adjusted[finite], multipletests(p[finite], method="holm")[1])
    assert math.isnan(adjusted[4]), "a missing p-value stays missing and does not count in the family"
    # by hand: sorted 0.005, 0.01, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1, then running maximum
    expected = {0.005: 0.025, 0.01: 0.04, 0.03: 0.09, 0.04: 0.09, 0.5: 0.5}
    assert all(adjusted[i] == pytest.approx(expected[p[i]]) for i in np.flatnonzero(finite))


def two_way_data(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for a in ("1", "2", "4"):
        for b in ("x", "y"):
            for replicate in range(3):
                effect = (
                    {"1": 0.0, "2": -0.2, "4": -0.3}[a]
                    + (0.1 if b == "y" else 0.0)
                    + (0.15 if (a, b) == ("4", "y") else 0)
                )
                rows.append(
                    {
                        "model.n_layers": a,
                        "data.stride": b,
                        "seed": replicate,
                        "loss": 3.0 + effect + rng.normal(0, 0.03),
                    }
                )
    return pd.DataFrame(rows)


def test_anova_matches_statsmodels_anova_lm_on_the_same_data():
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = two_way_data()
    table, reason = stats.anova(data, ["model.n_layers", "data.stride"], "loss")
    assert reason == ""
    frame = data.rename(columns={"model.n_layers": "a", "data.stride": "b"})
    reference = anova_lm(ols("loss ~ C(a) + C(b) + C(a):C(b)", data=frame).fit(), typ=2)
    table = table.set_index("term")
    for ours, theirs in (
        ("model.n_layers", "C(a)"),
        ("data.stride", "C(b)"),
        ("model.n_layers × data.stride", "C(a):C(b)"),
    ):
        assert table.loc[ours, "F"] == pytest.approx(reference.loc[theirs, "F"])
        assert table.loc[ours, "p_value"] == pytest.approx(reference.loc[theirs, "PR(>F)"])
        assert table.loc[ours, "df"] == reference.loc[theirs, "df"]
        ss, residual = reference.loc[theirs, "sum_sq"], reference.loc["Residual", "sum_sq"]
        assert table.loc[ours, "partial_eta_sq"] == pytest.approx(ss / (ss + residual))
    assert table.loc["residual", "df"] == 12, "18 runs - 6 cells"
    assert table.loc["model.n_layers × data.stride", "p_value"] < 0.05, "the planted interaction"


def test_one_way_anova_is_scipys_f_test():
    data = two_way_data()
    table, _ = stats.anova(data, ["model.n_layers"], "loss")
    groups = [g["loss"].to_numpy() for _, g in data.groupby("model.n_layers")]
    reference = scipy_stats.f_oneway(*groups)
    row = table.set_index("term").loc["model.n_layers"]
    assert row["F"] == pytest.approx(reference.statistic) and row["p_value"] == pytest.approx(reference.pvalue)


def test_anova_needs_two_levels_and_replicates():
    data = two_way_data()
    one_seed = data[data["seed"] == 0]
    assert (
        stats.anova(one_seed, ["model.n_layers", "data.stride"], "loss")[1]
        == "no replicate seeds to estimate the error"
    )
    assert "fewer than 2 levels" in stats.anova(data[data["data.stride"] == "x"], ["data.stride"], "loss")[1]


# ---------------------------------------------------------------- matched compute


def test_loss_at_a_budget_interpolates_in_log_tokens_and_never_extrapolates():
    tokens = np.array([1e5, 2e5, 4e5, 8e5])
    loss = 5.0 - 0.5 * np.log2(tokens / 1e5)  # straight in log tokens: interpolation is exact
    assert matched.loss_at(tokens, loss, 3e5) == pytest.approx(5.0 - 0.5 * np.log2(3.0))
    assert matched.loss_at(tokens, loss, 8e5) == pytest.approx(3.5), "the last point itself"
    assert math.isnan(matched.loss_at(tokens, loss, 9e5)) and math.isnan(matched.loss_at(tokens, loss, 5e4))


def test_common_budget_is_the_shortest_runs_end_and_says_when_ranges_do_not_overlap():
    budget = matched.common_budget([[1e5, 2e5, 3e5], [2e5, 4e5, 6e5]])
    assert (budget.value, budget.earliest, budget.reason) == (3e5, 2e5, "")
    apart = matched.common_budget([[1e5, 2e5], [4e5, 8e5]])
    assert math.isnan(apart.value) and "first evaluation" in apart.reason
    assert matched.epochs_to_overlap([1e5, 4e5], [1e5, 4e5]) == 5, "4 epochs of the short run reach 4e5, plus one"
